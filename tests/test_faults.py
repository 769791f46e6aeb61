"""Faults an independent test found (issue 14), each reproduced with real processes and real files.

Hostile directories given to `rlx eval` / `rlx sample` / `rlx train`, a full disk inside
``torch.save``, reruns of finished runs, two processes on one run directory, ``trainer.resume=none``
over an old run, signals during the final evaluation, bad bytes in data files, and more.
"""

from __future__ import annotations

import copy
import json
import shutil
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, RLX, TINY_GPT, rlx_in_process, rlx_refused

RUN = [
    *TINY_GPT,
    "trainer.prompts_per_step=4",
    "trainer.group_size=4",
    "trainer.steps=3",
    "trainer.eval_every=0",
    "trainer.samples_every=1",
    "trainer.save_every=3",
    "task.eval_size=16",
    "trainer.device=cpu",
]


def one_error_line(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("rlx: error: "), res.stderr[-3000:]
    return lines[0]


def final_error_line(res) -> str:
    """A failure after training started: the progress bar, then one error line, and no traceback."""
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("rlx: error: "), res.stderr[-3000:]
    return last


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short finished run (logger=none): its final/ model and checkpoints/step_000003."""
    cwd = tmp_path_factory.mktemp("finished")
    res = rlx_in_process("train", *RUN, "logger=none", "hydra.run.dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd / "run"


def hostile_copy(src: Path, dst: Path, edit) -> Path:
    """A copy of a model directory whose rlx_config.yaml was edited by someone else."""
    shutil.copytree(src, dst)
    cfg = yaml.safe_load((dst / "rlx_config.yaml").read_text())
    edit(cfg)
    (dst / "rlx_config.yaml").write_text(yaml.safe_dump(cfg))
    return dst


# -- item 1: nothing named in a directory is executed ---------------------------------------------
HOSTILE_EDITS = {
    "task_target_os_system": lambda c, pwned: c.__setitem__(
        "task", {"name": "sort", "_target_": "os.system", "command": f"touch {pwned}"}
    ),
    "model_target_os_system": lambda c, pwned: c.__setitem__(
        "model", {"name": "tiny_gpt", "_target_": "os.system", "command": f"touch {pwned}"}
    ),
    "unknown_task_name": lambda c, pwned: c.__setitem__(
        "task", {"name": "../../evil", "_target_": "os.system", "command": f"touch {pwned}"}
    ),
    "custom_reward_module": lambda c, pwned: c.__setitem__("reward", {"name": "custom", "fn": "evil:reward"}),
}


@pytest.mark.parametrize("command", ["eval", "sample"])
@pytest.mark.parametrize("edit", list(HOSTILE_EDITS))
def test_a_hostile_directory_config_runs_nothing(finished, tmp_path, command, edit):
    pwned = tmp_path / "pwned"
    # a module the hostile config names, importable from the working directory: importing it is the attack
    (tmp_path / "evil.py").write_text(
        f"open({str(pwned)!r}, 'w').write('x')\ndef reward(p, c): return [0.0]*len(c)\n"
    )
    model_dir = hostile_copy(finished / "final", tmp_path / "model", lambda c: HOSTILE_EDITS[edit](c, pwned))
    extra = ["-p", "3 1 2 0"] if command == "sample" else []
    res = rlx_refused(command, str(model_dir), *extra, "--device", "cpu", cwd=tmp_path)
    if edit == "custom_reward_module" and command == "sample":  # sample uses no reward: nothing imported
        assert res.returncode == 0, res.stderr[-2000:]
        assert not pwned.exists(), "code named in a directory's config was executed"
        return
    line = one_error_line(res)
    assert not pwned.exists(), "code named in a directory's config was executed"
    assert "rlx_config.yaml" in line
    if edit == "custom_reward_module":
        assert "--reward-fn" in line


def test_auto_map_code_in_a_model_directory_is_never_run(finished, tmp_path):
    """config.json's auto_map names Python files of the directory; transformers would run them (or ask
    on a terminal) unless trust_remote_code=False is passed."""
    pwned = tmp_path / "pwned"
    model_dir = tmp_path / "model"
    shutil.copytree(finished / "final", model_dir)
    (model_dir / "evil_config.py").write_text(
        f"open({str(pwned)!r}, 'w').write('x')\n"
        "from transformers import GPT2Config\nclass EvilConfig(GPT2Config):\n    model_type = 'evil'\n"
    )
    config = json.loads((model_dir / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil_config.EvilConfig", "AutoModelForCausalLM": "evil_config.X"}
    (model_dir / "config.json").write_text(json.dumps(config))
    for command in (["eval", str(model_dir)], ["sample", str(model_dir), "-p", "3 1 2 0", "--no-base"]):
        res = rlx_in_process(*command, "--device", "cpu", cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
        assert not pwned.exists(), res.stderr[-2000:]
        assert "Traceback" not in res.stderr, res.stderr[-3000:]
    res = rlx_in_process(
        "train", *RUN, "logger=none", f"model.init_from={model_dir}", "hydra.run.dir=r", cwd=tmp_path
    )
    assert not pwned.exists()
    assert "Traceback" not in res.stderr, res.stderr[-3000:]


def test_a_custom_reward_is_taken_from_the_command_line(finished, tmp_path):
    """--reward-fn names the user's own code; the directory's reward.fn is ignored."""
    model_dir = hostile_copy(
        finished / "final",
        tmp_path / "model",
        lambda c: c.__setitem__("reward", {"name": "custom", "fn": "evil:r"}),
    )
    res = rlx_in_process(
        "eval",
        str(model_dir),
        "--device",
        "cpu",
        "--json",
        "--reward-fn",
        "tests.rewards_for_tests:length",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["eval/reward"] >= 0


# -- item 2 / 13: a full disk, an atomic final/ -----------------------------------------------------
def run_with_file_limit(limit: int, cwd: Path, *args: str):
    """`rlx train` in a process whose files may not grow past ``limit`` bytes: writes past it fail with
    EFBIG exactly where a full disk fails them with ENOSPC (inside torch.save, safetensors, json)."""
    import os
    import resource
    import signal
    import subprocess

    def limit_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails instead of killing the process
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [RLX, "train", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        preexec_fn=limit_files,
    )


def test_a_full_disk_inside_torch_save_is_one_line_and_the_run_failed(tmp_path):
    # trainer_state.pt (~210 kB) crosses the limit inside a tensor record, the model (~60 kB) does not:
    # torch.save's zip writer raises RuntimeError ("unexpected pos"), as on a full 3 MB tmpfs
    res = run_with_file_limit(150_000, tmp_path, *RUN, "logger=none", "hydra.run.dir=run")
    line = final_error_line(res)
    assert "could not write checkpoint" in line and "step_000003" in line and "no earlier checkpoint" in line
    run = tmp_path / "run"
    assert not [p for p in (run / "checkpoints").iterdir()]  # the temporary directory is gone
    assert json.loads((run / "tracking.json").read_text())["status"] == "FAILED"


def test_final_is_written_atomically(tmp_path):
    # no checkpoints; the model itself (~60 kB) cannot be written: final/ must not exist half-written
    res = run_with_file_limit(
        40_000, tmp_path, *RUN, "trainer.save_every=0", "logger=none", "hydra.run.dir=run"
    )
    line = final_error_line(res)
    run = tmp_path / "run"
    assert "could not write" in line and str(run / "final") in line
    assert not (run / "final").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".final")]
    assert json.loads((run / "tracking.json").read_text())["status"] == "FAILED"


# -- items 3, 5, 11, 12: reruns, finished runs, extensions, refusals that write nothing ----------------
def mlflow_history(store: Path, run_dir: Path, key: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    run_id = json.loads((run_dir / "tracking.json").read_text())["run_id"]
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def mlflow_runs(store: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def snapshot(run_dir: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_mlflow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A finished run logged to a real MLflow store: (working directory, store)."""
    cwd = tmp_path_factory.mktemp("finished_mlflow")
    res = rlx_in_process("train", *RUN, "logger.store_dir=store", "hydra.run.dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    return cwd, cwd / "store"


def copy_run(src_cwd: Path, dst: Path) -> Path:
    shutil.copytree(src_cwd, dst, dirs_exist_ok=True)
    return dst


def test_rerunning_a_finished_run_says_so_and_logs_nothing(finished_mlflow, tmp_path):
    cwd = copy_run(finished_mlflow[0], tmp_path / "w")
    run, store = cwd / "run", cwd / "store"
    before = snapshot(run)
    res = rlx_in_process("train", *RUN, f"logger.store_dir={store}", "hydra.run.dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "already finished" in res.stderr and "nothing to do" in res.stderr
    assert snapshot(run) == before  # not a byte changed, .hydra/ included
    assert mlflow_history(store, run, "eval/exact") == [3]
    assert len(mlflow_runs(store)) == 1


def test_a_kill_after_the_final_evaluation_row_logs_it_once(finished_mlflow, tmp_path):
    """The state a kill leaves after the final evaluation row and before final/: the rerun evaluates
    again, and metrics.jsonl and MLflow still hold that row once."""
    cwd = copy_run(finished_mlflow[0], tmp_path / "w")
    run, store = cwd / "run", cwd / "store"
    shutil.rmtree(run / "final")
    info = json.loads((run / "tracking.json").read_text())
    (run / "tracking.json").write_text(json.dumps({**info, "status": "RUNNING"}))
    res = rlx_in_process("train", *RUN, f"logger.store_dir={store}", "hydra.run.dir=run", cwd=cwd)
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3] and "eval/exact" in rows[-1]
    assert mlflow_history(store, run, "eval/exact") == [3]
    assert mlflow_history(store, run, "reward/mean") == [1, 2, 3]
    assert len(mlflow_runs(store)) == 1 and (run / "final" / "model.safetensors").is_file()


def test_resume_none_never_destroys_a_previous_run(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    line = one_error_line(
        rlx_refused("train", *RUN, "logger=none", "hydra.run.dir=run", "trainer.resume=none", cwd=tmp_path)
    )
    assert "trainer.resume=none" in line and "hydra.run.dir=run-2" in line
    assert snapshot(run) == before


def test_a_refused_resume_writes_nothing(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    before = snapshot(run)
    line = one_error_line(
        rlx_refused("train", *RUN, "logger=none", "hydra.run.dir=run", "trainer.lr=1e-3", cwd=tmp_path)
    )
    assert "different config" in line and "trainer.lr" in line and "hydra.run.dir=" in line
    assert snapshot(run) == before  # .hydra/overrides.yaml keeps the run's own overrides


def test_a_truncated_model_file_is_found_before_anything_is_written(finished, tmp_path):
    run = shutil.copytree(finished, tmp_path / "run")
    shutil.rmtree(run / "final")  # an unfinished run: the rerun resumes from its newest checkpoint
    info = json.loads((run / "tracking.json").read_text())
    (run / "tracking.json").write_text(json.dumps({**info, "status": "RUNNING"}))
    weights = run / "checkpoints" / "step_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    before = snapshot(run)
    line = one_error_line(rlx_refused("train", *RUN, "logger=none", "hydra.run.dir=run", cwd=tmp_path))
    assert "corrupt or truncated" in line and "model.safetensors" in line
    assert snapshot(run) == before  # metrics.jsonl not truncated, tracking.json still RUNNING


EXTEND = ["trainer.lr_schedule=constant", "logger=none", "trainer.samples_every=100"]


def test_a_finished_run_with_a_constant_lr_extends_exactly(tmp_path):
    from tests.test_resume import metrics

    long = rlx_in_process("train", *RUN, *EXTEND, "trainer.steps=6", "hydra.run.dir=long", cwd=tmp_path)
    assert long.returncode == 0, long.stderr[-2000:]
    short = rlx_in_process("train", *RUN, *EXTEND, "hydra.run.dir=short", cwd=tmp_path)
    assert short.returncode == 0, short.stderr[-2000:]
    more = rlx_in_process("train", *RUN, *EXTEND, "trainer.steps=6", "hydra.run.dir=short", cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-2000:]
    assert "resumed from" in more.stderr and "step_000003" in more.stderr.replace("\n", "")
    assert metrics(tmp_path / "short") == metrics(tmp_path / "long")  # the 6-step run, bit for bit
    # a cosine schedule depends on trainer.steps from step 1: refused, and it says why
    line = one_error_line(
        rlx_refused("train", *RUN, "logger=none", "trainer.steps=6", "hydra.run.dir=short", cwd=tmp_path)
    )
    assert "trainer.lr_schedule" in line or "lr_schedule=" in line


def test_a_kill_before_the_first_checkpoint_leaves_no_orphan_mlflow_run(tmp_path):
    import signal

    from tests.test_resume import start, wait_for

    args = ["trainer.save_every=0", "trainer.steps=40", "logger.store_dir=store", "hydra.run.dir=run"]
    proc = start(tmp_path, *args)
    run = tmp_path / "run"
    wait_for(
        lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").read_text().count("\n") >= 2,
        proc,
    )
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    first_id = json.loads((run / "tracking.json").read_text())["run_id"]
    from tests.test_resume import RUN as RESUME_RUN

    res = rlx_in_process("train", *RESUME_RUN, *args, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    runs = mlflow_runs(tmp_path / "store")
    assert [r.info.run_id for r in runs] == [first_id] and runs[0].info.status == "FINISHED"
    assert mlflow_history(tmp_path / "store", run, "reward/mean") == list(range(1, 41))  # each step once


# -- item 4: one process per run directory; item 9: a signal during the final evaluation --------------
def test_a_second_process_on_a_run_directory_is_refused(tmp_path):
    import signal

    from tests.test_resume import start, wait_for

    args = ["trainer.steps=400", "trainer.save_every=0", "logger=none", "hydra.run.dir=run"]
    first = start(tmp_path, *args)
    run = tmp_path / "run"
    try:
        wait_for(
            lambda: (run / "metrics.jsonl").is_file() and (run / "metrics.jsonl").stat().st_size > 0, first
        )
        hydra_before = snapshot(run / ".hydra")
        second = rlx_in_process("train", *RUN, *args, cwd=tmp_path)
        line = one_error_line(second)
        assert "in use by another rlx process" in line and "hydra.run.dir=run-2" in line
        assert snapshot(run / ".hydra") == hydra_before
        # the same through the Python API (a sweep job's directory is known only inside Hydra)
        from rlx.errors import RlxError
        from rlx.train import build
        from tests.conftest import compose_cfg
        from tests.test_resume import RUN as RESUME_RUN

        with pytest.raises(RlxError, match="in use by another rlx process"):
            build(compose_cfg([*RESUME_RUN, *args[:-1]]), run_dir=run)
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()


def test_a_signal_during_the_final_evaluation_stops_it(tmp_path):
    import signal

    from tests.test_resume import start, wait_for

    # a long final evaluation: 5000 held-out prompts, 4 at a time
    args = ["task.eval_size=5000", "eval.batch_size=4", "logger=none", "hydra.run.dir=run"]
    proc = start(
        tmp_path,
        *[a for a in RUN if not a.startswith(("task.eval_size", "trainer.steps"))],
        "trainer.steps=3",
        *args,
    )
    run = tmp_path / "run"
    wait_for(lambda: (run / "checkpoints" / "step_000003" / "trainer_state.pt").is_file(), proc)
    time.sleep(0.5)
    sent = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert time.time() - sent < 5, "the final evaluation went on after SIGTERM"
    assert "stopped by SIGTERM after step 3" in err
    assert json.loads((run / "tracking.json").read_text())["status"] == "KILLED"
    assert not (run / "final").exists()
    res = rlx_in_process("train", *RUN, *args, cwd=tmp_path)  # the same command: evaluates, finishes
    assert res.returncode == 0, res.stderr[-2000:]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 3]


def test_a_stop_raised_inside_a_library_that_catches_exception_is_still_a_stop():
    """The signal handler raises `StopNow` at whatever bytecode runs. Once (a fresh-clone run of the
    test above) SIGTERM landed inside the tokenizer: transformers' ``BatchEncoding.convert_to_tensors``
    wraps any Exception in a ValueError, and the run ended "no pad token" (exit 2) instead of stopped.
    The same path here, deterministically: the stop is raised while transformers builds the tensor."""
    from transformers import BatchEncoding

    from rlx.errors import StopNow

    class StopsWhenRead(list):
        def __len__(self) -> int:
            raise StopNow(15)

    batch = BatchEncoding({"input_ids": StopsWhenRead([[1, 2], [3, 4]])})
    with pytest.raises(StopNow):
        batch.convert_to_tensors("pt")


# -- every documented key: a zero, a negative, a string, a huge value ---------------------------------
VALUES = {"zero": "0", "negative": "-1", "string": "x", "huge": "1000000000000"}
TASKS = ("sort", "tokens")


def documented_keys() -> list[tuple[str, str]]:
    """(task, key) for every trainer.*, rollout.*, eval.* key and every key of each task config."""
    from tests.conftest import compose_cfg

    base = compose_cfg([])
    keys = [("sort", f"{s}.{k}") for s in ("trainer", "rollout", "eval") for k in base[s]]
    for task in TASKS:
        node = compose_cfg([f"task={task}"]).task
        keys += [(task, f"task.{k}") for k in node if k not in ("name", "_target_")]
    return keys


# What plan() accepts, each a value a run must complete with (checked by the real runs below).
ACCEPTED = {
    "trainer.seed=0": "a seed",
    "trainer.steps=0": "evaluates the initial model only",
    "trainer.warmup_ratio=0": "no warmup (the default)",
    "trainer.min_lr_ratio=0": "cosine to 0",
    "trainer.grad_clip=1000000000000": "no effective clipping",
    "trainer.micro_batch_size=1000000000000": "one micro-batch",
    "trainer.eval_every=0": "evaluate at the end only",
    "trainer.eval_every=1000000000000": "evaluate at the end only",
    "trainer.save_every=0": "no checkpoints",
    "trainer.save_every=1000000000000": "only the last step's checkpoint",
    "trainer.keep_checkpoints=0": "keep every checkpoint",
    "trainer.keep_checkpoints=1000000000000": "keep every checkpoint",
    "trainer.samples_every=0": "no samples",
    "trainer.samples_every=1000000000000": "no samples after the first",
    "trainer.resume=x": "refused in one line when the run directory is known (no such checkpoint)",
    "trainer.max_nonfinite=1000000000000": "skip non-finite updates without limit",
    "trainer.lr=1000000000000": "finite; the loops must stop on the non-finite weights it makes (item 6)",
    "rollout.temperature=1000000000000": "uniform sampling",
    "rollout.top_k=0": "off (the default)",
    "rollout.top_k=1000000000000": "off in effect",
    "eval.batch_size=1000000000000": "one evaluation batch",
    "task.seed=0": "a seed",
    "task.seed=1000000000000": "a seed",
    "task.start=0": "token 0 (the default)",
    "task.target=0": "token 0",
}


def test_every_key_refuses_bad_values_in_one_line_before_any_work():
    """In-process through rlx.train.plan on composed configs: every value is refused with one line that
    names its key (RlxError, what the CLI prints as `rlx: error: ...` with exit 2), or is one of the
    documented ACCEPTED values; never another exception."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from rlx.errors import RlxError
    from rlx.train import plan
    from tests.conftest import compose_cfg

    # Each task's config is composed once; each value is then applied the way Hydra's config loader
    # applies a command-line override (its parser's typed value, OmegaConf.update): ~200 composes less.
    parser = OverridesParser.create()
    composed = {task: compose_cfg([f"task={task}"]) for task in TASKS}
    accepted, problems = set(), []
    for task, key in documented_keys():
        for value in VALUES.values():
            override = f"{key}={value}"
            cfg = copy.deepcopy(composed[task])
            if key != "trainer.device":
                OmegaConf.update(cfg, "trainer.device", "cpu", merge=True)
            OmegaConf.update(cfg, key, parser.parse_override(override).value(), merge=True)
            try:
                plan(cfg)
            except RlxError as exc:
                message = str(exc)
                if "\n" in message or key.split(".", 1)[1] not in message:
                    problems.append(f"{override}: {message!r} does not name {key} in one line")
                continue
            except Exception as exc:
                problems.append(f"{override}: {type(exc).__name__}: {exc}")
                continue
            accepted.add(override)
    assert not problems, "\n".join(problems)
    assert accepted == set(ACCEPTED), (accepted - set(ACCEPTED), set(ACCEPTED) - accepted)


ACCEPTED_RUNS = {
    "evaluate_only": ["trainer.steps=0"],
    "zeros": [
        "trainer.seed=0",
        "trainer.warmup_ratio=0",
        "trainer.min_lr_ratio=0",
        "trainer.eval_every=0",
        "trainer.save_every=0",
        "trainer.keep_checkpoints=0",
        "trainer.samples_every=0",
        "rollout.top_k=0",
        "task.seed=0",
    ],
    "huge": [
        "trainer.grad_clip=1000000000000",
        "trainer.micro_batch_size=1000000000000",
        "trainer.eval_every=1000000000000",
        "trainer.save_every=1000000000000",
        "trainer.keep_checkpoints=1000000000000",
        "trainer.samples_every=1000000000000",
        "trainer.max_nonfinite=1000000000000",
        "rollout.temperature=1000000000000",
        "rollout.top_k=1000000000000",
        "eval.batch_size=1000000000000",
        "task.seed=1000000000000",
    ],
    "tokens": ["task=tokens", "reward=token_match", "task.start=0", "task.target=0", "reward.target=0"],
}


def test_the_accepted_values_run_to_the_end(tmp_path):
    """Real `rlx train` processes with every ACCEPTED value (several per process): each completes, or
    (trainer.resume=x) is refused in one line before any work. trainer.lr=1e12 is left to the loops'
    non-finite weight check (issue 14 item 6)."""
    covered = {o for runs in ACCEPTED_RUNS.values() for o in runs} | {
        "trainer.resume=x",
        "trainer.lr=1000000000000",
    }
    assert set(ACCEPTED) <= covered
    for name, overrides in ACCEPTED_RUNS.items():
        drop = {x.split("=")[0] for x in overrides} | (
            {"task.eval_size"} if "task=tokens" in overrides else set()
        )
        base = [o for o in RUN if o.split("=")[0] not in drop]
        res = rlx_in_process("train", *base, *overrides, "logger=none", f"hydra.run.dir={name}", cwd=tmp_path)
        assert res.returncode == 0, (name, res.stderr[-2000:])
        assert (tmp_path / name / "final" / "model.safetensors").is_file()
    line = one_error_line(
        rlx_refused("train", *RUN, "logger=none", "trainer.resume=x", "hydra.run.dir=r", cwd=tmp_path)
    )
    assert "trainer.resume=x" in line and not (tmp_path / "r").exists()


# -- item 8, item 10: bad bytes, bad rewards, bad output paths, the start-up gaps ----------------------
def test_binary_garbage_in_a_jsonl_file_names_the_line(tmp_path):
    data = tmp_path / "pairs.jsonl"
    good = (REPO / "tests" / "data" / "sort_pairs_tiny.jsonl").read_bytes().splitlines(keepends=True)
    data.write_bytes(b"".join(good[:2]) + b"\xff\xfe\x00\x81garbage\x9c\n" + b"".join(good[2:]))
    line = one_error_line(
        rlx_in_process(
            "train", *RUN, "algo=dpo", "algo.batch_size=4", f"data.train={data}", "logger=none", cwd=tmp_path
        )
    )
    assert f"{data} line 3: not valid JSON" in line


def test_a_custom_reward_returning_strings_is_one_line(tmp_path):
    res = rlx_in_process(
        "train",
        *RUN,
        "reward=custom",
        "reward.fn=tests.rewards_for_tests:strings",
        "logger=none",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    line = final_error_line(res)
    assert "returned 'good' (str), not a number" in line and "tests.rewards_for_tests:strings" in line


def test_data_sort_into_a_path_under_a_file_is_one_line(tmp_path):
    (tmp_path / "FILE").write_text("a file")
    line = one_error_line(
        rlx_refused("data", "sort", "--out", "FILE/x", "--train", "10", "--heldout", "5", cwd=tmp_path)
    )
    assert "--out FILE/x" in line and "not a directory" in line
    assert (tmp_path / "FILE").read_text() == "a file"


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.eval_every=-1", "trainer.eval_every must be >= 0"),
        ("eval.batch_size=0", "eval.batch_size must be >= 1"),
        ("task.eval_size=0", "task.eval_size=0 must be between 1 and half"),
        ("rollout.max_new_tokens=0", "rollout.max_new_tokens must be >= 1 or null"),
        ("rollout.max_new_tokens=100", "do not fit model.n_positions=64"),
        ("trainer.lr=inf", "trainer.lr must be finite"),
        ("task.prompts=[[1,x]]", "task.prompts must be a list of integer lists"),
        ("task.seed=-1", "task.seed must be >= 0"),
    ],
)
def test_start_up_gaps_are_closed(tmp_path, override, message):
    line = one_error_line(rlx_refused("train", *RUN, override, "logger=none", cwd=tmp_path))
    assert message in line
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.jsonl"))


def test_non_finite_values_are_null_in_metrics_and_iterations_count_from_one(tmp_path):
    """A reward of 3e38 overflows the loss at the first iteration: the message says iteration 1, and
    metrics.jsonl stays valid JSON (strict parser: no Infinity or NaN)."""
    res = rlx_in_process(
        "train",
        *RUN,
        "reward=custom",
        "reward.fn=tests.rewards_for_tests:huge",
        "trainer.on_nonfinite=skip",
        "trainer.max_nonfinite=2",
        "logger=none",
        "hydra.run.dir=run",
        cwd=tmp_path,
        env={"PYTHONPATH": str(REPO)},
    )
    line = final_error_line(res)
    assert "at iteration 2:" in line and "2 updates in a row skipped" in line  # iterations 1 and 2 skipped
    text = (tmp_path / "run" / "metrics.jsonl").read_text()

    def strict(token: str) -> None:
        raise ValueError(f"not JSON: {token}")

    rows = [json.loads(line, parse_constant=strict) for line in text.splitlines()]
    assert rows and rows[0]["step"] == 1
    assert any(v is None for v in rows[0].values())  # reward/mean = inf (3e38 * 16 / 16 overflows float32)
