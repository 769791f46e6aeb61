"""Runs that survive: real processes killed with SIGKILL and SIGINT mid-training, then resumed.

A resumed run must reproduce the uninterrupted run's per-step metrics bit for bit on CPU (times and
throughputs aside), continue the same MLflow run, and leave nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from rlx.checkpoint import list_checkpoints, load_model_weights, save_checkpoint
from rlx.errors import RlxError
from rlx.train import build
from tests.conftest import REPO, RLX, TINY_GPT, compose_cfg, rlx_in_process, rlx_refused

STEPS = 24
RUN = [
    *TINY_GPT,
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    f"trainer.steps={STEPS}",
    "trainer.eval_every=5",
    "trainer.samples_every=1",
    "trainer.save_every=3",
    "task.eval_size=16",
    "trainer.device=cpu",
]
VOLATILE = ("time", "throughput", "memory")  # wall-clock and memory figures differ between any two runs


def metrics(run_dir: Path) -> list[dict[str, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(VOLATILE)} for r in rows]


def start(cwd: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen(
        [RLX, "train", *RUN, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"rlx exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.time() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, float]]:
    """The uninterrupted run."""
    cwd = tmp_path_factory.mktemp("reference")
    res = rlx_in_process("train", *RUN, "logger=none", "hydra.run.dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = metrics(cwd / "run")
    assert [r["step"] for r in rows][:STEPS] == list(range(1, STEPS + 1))
    return rows


def test_sigkill_then_resume_auto_reproduces_the_uninterrupted_run(tmp_path, reference):
    proc = start(tmp_path, "logger=none", "hydra.run.dir=run")
    run = tmp_path / "run"
    wait_for(lambda: (run / "checkpoints" / "step_000009").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    newest = list_checkpoints(run / "checkpoints")[-1]
    assert int(newest.name.split("_")[1]) < STEPS  # it really was cut short
    # the same command again: trainer.resume=auto picks up the newest complete checkpoint
    res = rlx_in_process("train", *RUN, "logger=none", "hydra.run.dir=run", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resumedfrom{newest}" in "".join(res.stderr.split())  # the log handler wraps long lines
    assert metrics(run) == reference  # bit for bit, every step, eval rows included
    assert not list((run / "checkpoints").glob(".step_*"))  # no half-written checkpoint left over


def test_sigint_saves_kills_the_mlflow_run_and_resume_continues_it(tmp_path, reference):
    store = tmp_path / "store"
    proc = start(tmp_path, f"logger.store_dir={store}", "hydra.run.dir=run")
    run = tmp_path / "run"
    wait_for(
        lambda: (
            (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 4
        ),
        proc,
    )
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT, err[-2000:]
    line = [ln for ln in err.splitlines() if ln.startswith("rlx: stopped by SIGINT")]
    assert line, err[-2000:]
    stopped_at = int(line[0].split("after step ")[1].split(";")[0])
    assert stopped_at < STEPS
    checkpoint = run / "checkpoints" / f"step_{stopped_at:06d}"
    assert (checkpoint / "trainer_state.pt").is_file()  # the step it finished was saved
    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    info = json.loads((run / "tracking.json").read_text())
    assert client.get_run(info["run_id"]).info.status == "KILLED"

    # resume by path from another directory: the run continues in its own run directory
    res = rlx_in_process(
        "train",
        *RUN,
        f"logger.store_dir={store}",
        "hydra.run.dir=elsewhere",
        f"trainer.resume={checkpoint}",
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert metrics(run) == reference
    finished = client.get_run(info["run_id"])
    assert finished.info.status == "FINISHED"
    history = client.get_metric_history(info["run_id"], "reward/mean")
    assert sorted(m.step for m in history) == list(range(1, STEPS + 1))  # same run, no step twice
    assert len(client.search_runs([finished.info.experiment_id])) == 1


def test_sigterm_stops_the_same_way(tmp_path):
    proc = start(tmp_path, "logger=none", "hydra.run.dir=run")
    run = tmp_path / "run"
    wait_for(lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in err
    assert json.loads((run / "tracking.json").read_text())["status"] == "KILLED"
    assert list_checkpoints(run / "checkpoints")


@pytest.fixture(scope="module")
def checkpointed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short finished run with checkpoints, for the bad-input tests to damage copies of."""
    cwd = tmp_path_factory.mktemp("checkpointed")
    res = rlx_in_process("train", *RUN, "trainer.steps=3", "logger=none", "hydra.run.dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd / "run" / "checkpoints" / "step_000003"


def _resume_error(tmp_path: Path, checkpoint: Path, *extra: str) -> str:
    res = rlx_refused(
        "train",
        *RUN,
        "trainer.steps=3",
        "logger=none",
        "hydra.run.dir=new",
        f"trainer.resume={checkpoint}",
        *extra,
        cwd=tmp_path,
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlx: error: "), res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    return lines[0]


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src.parent.parent, dst)  # the whole run directory
    return dst / "checkpoints" / src.name


@pytest.mark.parametrize("damage", ["truncate_state", "truncate_weights", "garbage_state"])
def test_a_corrupt_checkpoint_is_one_clear_error(tmp_path, checkpointed, damage):
    ckpt = _copy(checkpointed, tmp_path / "run")
    if damage == "truncate_state":
        f = ckpt / "trainer_state.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "truncate_weights":
        f = ckpt / "model.safetensors"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    else:
        (ckpt / "trainer_state.pt").write_bytes(b"not a checkpoint at all")
    line = _resume_error(tmp_path, ckpt)
    assert "corrupt or truncated" in line and str(ckpt) in line


def test_a_checkpoint_from_another_config_is_refused(tmp_path, checkpointed):
    line = _resume_error(tmp_path, checkpointed, "trainer.lr=1e-3")
    assert "different config" in line and "trainer.lr" in line
    line = _resume_error(tmp_path, checkpointed, "model.n_embd=64")
    assert "model.n_embd" in line


def test_a_missing_resume_path_is_one_clear_error(tmp_path):
    line = _resume_error(tmp_path, tmp_path / "nope")
    assert "trainer.resume" in line and "nope" in line


def test_weights_of_another_model_do_not_load(checkpointed):
    from rlx.models import build_tiny_gpt
    from rlx.tasks.sort import SortTask

    bigger = build_tiny_gpt(SortTask(), n_layer=1, n_embd=64, n_head=2)
    with pytest.raises(RlxError, match="does not fit the configured model"):
        load_model_weights(bigger.model, checkpointed)


def test_a_full_disk_while_saving_keeps_the_previous_checkpoint(tmp_path):
    # A real write failure from the OS: the file-size limit makes writes past it fail with EFBIG,
    # as a full disk fails them with ENOSPC.
    session = build(compose_cfg([*RUN, "trainer.steps=1", "logger=none"]), run_dir=tmp_path)
    first = session.save()
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    session.trainer.step = 2
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, old_limit[1]))
    try:
        with pytest.raises(RlxError, match=r"could not write checkpoint .*step_000002.* is intact"):
            session.save()
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)
        session.tracker.close()
    root = tmp_path / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == [first.name]
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before  # untouched
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # the partial write is gone


def test_an_unwritable_output_directory_is_one_clear_error(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    res = rlx_refused("train", *RUN, "logger=none", f"hydra.run.dir={blocker}/run", cwd=tmp_path)
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    assert str(blocker) in res.stderr and "rlx: error" in res.stderr


def test_checkpoints_hold_no_pickled_objects(checkpointed):
    state = torch.load(checkpointed / "trainer_state.pt", weights_only=True)  # raises on any object
    assert state["step"] == 3 and "optimizer" in state and "rng" in state and "loop" in state


def test_save_checkpoint_keeps_the_newest_k(tmp_path):
    session = build(compose_cfg([*RUN, "logger=none"]), run_dir=tmp_path)
    for step in range(1, 5):
        session.trainer.step = step
        save_checkpoint(
            tmp_path / "ck", step, session.trainer.policy, config_yaml="x: 1\n", trainer_state={}, keep=2
        )
    session.tracker.close()
    assert [p.name for p in list_checkpoints(tmp_path / "ck")] == ["step_000003", "step_000004"]


ALGOS = {
    "grpo": ["algo=grpo"],
    "dapo": ["algo=dapo"],
    "rloo_kl_in_reward": ["algo=rloo", "kl=k1", "kl.coef=0.05", "kl.placement=reward", "kl.ref_refresh=2"],
    "ppo_head": ["algo=ppo", "algo.critic=head", "algo.epochs=2", "algo.minibatches=2"],
    "ppo_separate_adaptive_kl": ["algo=ppo", "algo.critic=separate", "kl.adaptive_target=0.5"],
    "trpo": ["algo=trpo"],
    # offline: data position (epoch, index, shuffle seed), the reference, dropout's RNG in SFT/RM
    "sft": ["algo=sft", "algo.batch_size=4", "data.train=tests/data/sort_sft_tiny.jsonl"],
    "rm": ["algo=rm", "algo.batch_size=4", "data.train=tests/data/sort_pairs_tiny.jsonl"],
    "dpo": ["algo=dpo", "algo.batch_size=4", "data.train=tests/data/sort_pairs_tiny.jsonl"],
    "ipo_precomputed_ref": [
        "algo=ipo",
        "algo.batch_size=4",
        "algo.precompute_ref=true",
        "data.train=tests/data/sort_pairs_tiny.jsonl",
    ],
}


@pytest.mark.parametrize("algo", list(ALGOS))
def test_every_algorithm_resumes_bit_for_bit(algo, tmp_path):
    """A run resumed from a checkpoint written mid-run reproduces the rest of the uninterrupted run."""
    import shutil

    from rlx.train import train

    extra = [o.replace("tests/data", str(REPO / "tests" / "data")) for o in ALGOS[algo]]
    overrides = [*RUN, *extra, "trainer.steps=6", "trainer.eval_every=2", "logger=none"]
    whole = tmp_path / "whole"
    train(compose_cfg(overrides), run_dir=whole)
    # a run "interrupted" after step 3: its checkpoint and the rows it had written by then (and after)
    cut = tmp_path / "cut"
    shutil.copytree(whole / "checkpoints" / "step_000003", cut / "checkpoints" / "step_000003")
    shutil.copy(whole / "metrics.jsonl", cut / "metrics.jsonl")
    train(compose_cfg(overrides), run_dir=cut)  # trainer.resume=auto
    assert metrics(cut) == metrics(whole)
    assert {r["step"] for r in metrics(cut)} >= {1, 2, 3, 4, 5, 6}
