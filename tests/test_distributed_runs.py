"""Whole runs under torchrun (trainer.parallel=ddp): real processes, gloo, 2 ranks, one thread each.

- `torchrun ... -m rlx.cli train` for grpo, dpo and ppo (value head) with trainer.parallel=fsdp2: one run
  directory, one set of checkpoints, metrics.jsonl once; SIGKILL after a checkpoint and the same
  command again reproduce the uninterrupted run's metrics.jsonl; a 2-rank checkpoint resumed by one
  process is refused in one line; fsdp2's final/ evaluated by one process equals the sharded evaluation.
- A non-finite loss, an exception, SIGTERM on one rank only: every rank ends alike, within 60 s.

(A file of its own, apart from tests/test_distributed.py, so that `make test`'s two workers share them.)
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from rlx.data.sort import write_sort_data
from tests.conftest import REPO, TINY_GPT, rlx_refused

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HYDRA_FULL_ERROR": "0", "PYTHONPATH": str(REPO)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
VOLATILE = ("time", "throughput", "memory")  # wall-clock and memory figures differ between any two runs


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("data")
    write_sort_data(out, train=48, heldout=16, task_eval_size=16, candidates=2)
    return out


# -- whole runs under torchrun ---------------------------------------------------------------------
RUN = [
    *TINY_GPT,
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.steps=6",
    "trainer.eval_every=0",
    "trainer.samples_every=1",
    "trainer.save_every=2",
    "task.eval_size=16",
    "trainer.device=cpu",
    "logger=none",
]


FSDP2_REWARD = "tests.rewards_for_tests:prompt_mean_plus_length"  # varies from prompt to prompt


def args_for(algo: str, data: Path) -> list[str]:
    if algo == "ppo-fsdp2":  # h11f: the policy sharded by FSDP2, a KL to the (whole) reference; h11g: PPO
        return [  # with its value head on the sharded trunk (the head optimized with the policy)
            *RUN,
            "algo=ppo",
            "algo.minibatches=2",
            "trainer.eval_every=3",
            "trainer.parallel=fsdp2",
            "reward=custom",
            f"reward.fn={FSDP2_REWARD}",
        ]
    if algo == "dpo":
        return [*RUN, "algo=dpo", "algo.batch_size=8", f"data.train={data / 'pairs_train.jsonl'}"]
    return [*RUN, f"algo={algo}"]


def descendants(pid: int) -> list[int]:
    """The processes under ``pid`` (from /proc: Linux)."""
    parent: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(stat.parent.name)] = int(fields[1])
    out, todo = [], [pid]
    while todo:
        here = todo.pop()
        kids = [p for p, pp in parent.items() if pp == here]
        out += kids
        todo += kids
    return out


class Launch:
    """``torchrun --nproc_per_node=2 -m rlx.cli train ARGS`` in ``cwd``, its output in files (a pipe
    nobody reads could fill up and stall the run)."""

    count = 0

    def __init__(self, cwd: Path, *args: str) -> None:
        Launch.count += 1
        self.log = cwd / f"torchrun-{Launch.count}.log"
        with self.log.open("w") as f:
            self.proc = subprocess.Popen(
                [*TORCHRUN, "-m", "rlx.cli", "train", *args],
                cwd=cwd,
                env=ENV,
                stdout=f,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def poll(self) -> int | None:
        return self.proc.poll()

    def kill_all(self) -> None:
        """SIGKILL to torchrun and both ranks at once (torchrun starts each worker in a session of its
        own, so the agent's process group does not reach them)."""
        for pid in [*descendants(self.proc.pid), self.proc.pid]:
            os.kill(pid, signal.SIGKILL)
        self.proc.wait(timeout=60)

    def output(self) -> str:
        return self.log.read_text()

    def finish(self, timeout: float = 240) -> tuple[int, str]:
        return self.proc.wait(timeout=timeout), self.output()


launch = Launch


def metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


@pytest.mark.parametrize("algo", ["grpo", "dpo", "ppo-fsdp2"])
def test_torchrun_train_then_sigkill_and_resume_is_the_same_run(
    tmp_path: Path, data: Path, algo: str
) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir()
    cut.mkdir()
    reference = launch(whole, *args_for(algo, data))  # Hydra's default run dir: ${now:...} per process
    proc = launch(cut, *args_for(algo, data), "hydra.run.dir=run")
    run = cut / "run"
    deadline = time.time() + 240
    while not (run / "checkpoints" / "step_000002" / "trainer_state.pt").is_file():
        assert proc.poll() is None, proc.output()[-3000:]
        assert time.time() < deadline, "no checkpoint"
        time.sleep(0.02)
    proc.kill_all()
    assert not (run / "final").exists()  # it really was cut short
    rows = (run / "metrics.jsonl").read_text()
    if algo == "grpo":  # resumed by a plain process: refused in one line before anything is written
        res = rlx_refused("train", *args_for(algo, data), "hydra.run.dir=run", cwd=cut)
        assert res.returncode == 2 and res.stderr.count("\n") == 1, res.stderr
        assert "written by 2 rank(s), this run has 1" in res.stderr
        assert (run / "metrics.jsonl").read_text() == rows
    code, err = reference.finish()
    assert code == 0, err[-3000:]
    dirs = [p for p in (whole / "outputs").glob("*/*") if p.is_dir()]
    assert len(dirs) == 1, dirs  # one run directory for both ranks
    ref_dir = dirs[0]
    assert sorted(p.name for p in (ref_dir / "checkpoints").iterdir()) == ["step_000004", "step_000006"]
    state = torch.load(ref_dir / "checkpoints" / "step_000006" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and len(state["rng_ranks"]) == 2
    assert not torch.equal(state["rng_ranks"][0]["torch"], state["rng_ranks"][1]["torch"])
    reference_rows = metrics(ref_dir)
    steps = [r["step"] for r in reference_rows]
    assert steps[: 6 + (algo == "dpo")] == ([0] if algo == "dpo" else []) + list(range(1, 7))  # written once
    code, err = launch(cut, *args_for(algo, data), "hydra.run.dir=run").finish()
    assert code == 0, err[-3000:]
    assert "resumed from" in err
    assert metrics(run) == reference_rows
    if algo == "ppo-fsdp2":
        # the sharded run wrote whole weights and a whole optimizer state (names, full shapes), which a
        # plain process reads: the checkpoint's Adam moments (the value head's, not part of the sharded
        # model, named after it: h11g), and `rlx eval` of final/, whose held-out metrics in one process
        # equal the run's final evaluation, sharded over the 2 ranks
        assert any("eval/exact" in r for r in reference_rows[:-1])  # a periodic, sharded evaluation too
        moments = state["optimizer"]["state"]
        adam = moments["model.transformer.wte.weight"]["exp_avg"]
        assert adam.shape == (14, 32) and adam.abs().sum() > 0
        head = moments["others.p0"]["exp_avg"]  # the value head's weight [1, 32]
        assert head.shape == (1, 32) and head.abs().sum() > 0
        assert (ref_dir / "final" / "value_head.safetensors").is_file()
        res = subprocess.run(
            [
                sys.executable,
                "-m",
                "rlx.cli",
                "eval",
                str(run / "final"),
                "--json",
                "--reward-fn",
                FSDP2_REWARD,
            ],
            cwd=cut,
            env=ENV,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert res.returncode == 0, res.stderr[-3000:]
        alone = json.loads(res.stdout.strip().splitlines()[-1])
        final = next(r for r in reference_rows if r["step"] == 6 and "eval/exact" in r)
        assert final["eval/reward"] > 1 and alone["eval/reward"] == final["eval/reward"]
        assert alone["eval/exact"] == final["eval/exact"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_a_nonfinite_loss_on_one_rank_stops_every_rank_alike(tmp_path: Path, parallel: str) -> None:
    """Rank 1's rewards overflow its loss; rank 0's are finite. Both ranks agree and stop with the same
    one-line error (exit 2), well within 60 s, and torchrun reports the failure. Under fsdp2 the ranks
    agree before the backward (its reduce-scatter is a collective rank 1 would skip)."""
    started = time.time()
    proc = launch(
        tmp_path,
        *RUN,
        f"trainer.parallel={parallel}",
        "adv_norm=none",
        "reward=custom",
        "reward.fn=tests.rewards_for_tests:huge_on_rank_1",
        "hydra.run.dir=run",
    )
    code, err = proc.finish(timeout=120)
    elapsed = time.time() - started
    assert code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("rlx: error: non-finite")]
    assert len(lines) == 2, err[-3000:]  # both ranks, the same decision
    assert "on another rank" in "".join(lines) and "at iteration 1" in lines[0]
    assert "exitcode  : 2" in err  # the root cause torchrun reports: the agreed error, not a kill
    assert elapsed < 60
    assert (tmp_path / "run" / "checkpoints" / "nonfinite_step_000000").is_dir()


def test_an_exception_on_one_rank_ends_every_rank(tmp_path: Path) -> None:
    """A reward that raises on rank 1 only: rank 1 says why, rank 0's next collective fails at once and
    it says that another rank ended; both are gone well within 60 s."""
    started = time.time()
    proc = launch(
        tmp_path,
        *RUN,
        "reward=custom",
        "reward.fn=tests.rewards_for_tests:raises_on_rank_1",
        "hydra.run.dir=run",
    )
    code, err = proc.finish(timeout=120)
    assert code != 0
    assert time.time() - started < 60
    assert "rlx: error: reward 'tests.rewards_for_tests:raises_on_rank_1' raised ValueError" in err
    assert "rlx: error: rank 0: another rank ended, so this one stops too" in err, err[-3000:]


def rank_pid(agent: int, rank: int) -> int:
    """The pid of torchrun's worker of ``rank`` (its environment says RANK=rank)."""
    for pid in descendants(agent):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    raise AssertionError(f"no rank {rank} under {agent}")


def test_sigterm_to_one_rank_stops_every_rank_at_the_same_step(tmp_path: Path) -> None:
    """SIGTERM reaches rank 1 only: the ranks agree at the end of the step, rank 0 writes the checkpoint,
    and both exit 143 with the same line, well within 60 s; the checkpoint is complete."""
    proc = launch(tmp_path, *RUN, "trainer.steps=500", "trainer.save_every=0", "hydra.run.dir=run")
    rows = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 240
    while not (rows.is_file() and len(rows.read_text().splitlines()) >= 2):
        assert proc.poll() is None and time.time() < deadline, proc.output()[-3000:]
        time.sleep(0.05)
    started = time.time()
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    code, err = proc.finish(timeout=120)
    assert time.time() - started < 60 and code != 0
    lines = [ln for ln in err.splitlines() if ln.startswith("rlx: stopped by SIGTERM")]
    assert len(lines) == 2 and lines[0] == lines[1], err[-3000:]  # the same step, the same checkpoint
    # each rank exits 143 (128 + SIGTERM) after its line, or, when torchrun's own SIGTERM (sent once the
    # first rank has exited) lands during the other's interpreter shutdown, -15: SIGTERM either way
    assert err.count("exitcode  : 143") + err.count("exitcode  : -15") == 2, err[-3000:]
    checkpoint = Path(lines[0].split("checkpoint ")[1].split(";")[0])
    state = torch.load(checkpoint / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["step"] == int(checkpoint.name.split("_")[1])
    assert len(rows.read_text().splitlines()) == state["step"]


@pytest.mark.parametrize("parallel", ["ddp", "fsdp2"])
def test_sigterm_to_one_rank_during_the_final_evaluation_stops_every_rank_alike(
    tmp_path: Path, parallel: str
) -> None:
    """SIGTERM reaches rank 1 only, during a long sharded final evaluation (after the last checkpoint):
    rank 1 stops generating, the ranks agree before the evaluation's gather, and both exit with the
    same "stopped by SIGTERM after step 3" line (not one stopped and one failed on a dead peer); the
    same command then evaluates and finishes (under ddp; with a larger eval.batch_size, a setting that
    may differ on resume, so that the rerun's 5000 prompts take seconds rather than ~30 s)."""
    args = [
        *[a for a in RUN if not a.startswith(("task.eval_size", "trainer.steps", "trainer.save_every"))],
        "trainer.steps=3",
        "trainer.save_every=3",
        "task.eval_size=5000",  # 2500 held-out prompts per rank, 4 at a time: many seconds
        "eval.batch_size=4",
        f"trainer.parallel={parallel}",
        "hydra.run.dir=run",
    ]
    proc = launch(tmp_path, *args)
    state = tmp_path / "run" / "checkpoints" / "step_000003" / "trainer_state.pt"
    deadline = time.time() + 240
    while not state.is_file():
        assert proc.poll() is None and time.time() < deadline, proc.output()[-3000:]
        time.sleep(0.05)
    time.sleep(1.0)  # into the final evaluation
    started = time.time()
    os.kill(rank_pid(proc.pid, 1), signal.SIGTERM)
    code, err = proc.finish(timeout=120)
    assert time.time() - started < 60 and code != 0, err[-3000:]
    lines = [ln for ln in err.splitlines() if ln.startswith("rlx: stopped by SIGTERM")]
    assert len(lines) == 2 and lines[0] == lines[1] and "after step 3" in lines[0], err[-3000:]
    assert "another rank ended" not in err, err[-3000:]
    assert not (tmp_path / "run" / "final").exists()
    if parallel == "fsdp2":  # fsdp2's resume is the kill-and-resume test's; the 5000-prompt rerun, ddp's
        return
    again = launch(tmp_path, *args, "eval.batch_size=250")  # resumes at step 3, evaluates, finishes
    code, err = again.finish(timeout=300)
    assert code == 0, err[-3000:]
    assert "resumed from" in err and "step_000003" in err.replace("\n", ""), err[-3000:]
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
