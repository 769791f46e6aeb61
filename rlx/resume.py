"""Resuming a run: find the checkpoint, check it belongs to this config, restore everything.

``trainer.resume``:

- ``auto`` (default): continue from the newest complete checkpoint in this job's run directory if
  there is one (rerun the same command with the same ``hydra.run.dir``, or relaunch a sweep with the
  same ``hydra.sweep.dir``), else start fresh.
- ``none``: start fresh; a run directory that already holds a run (checkpoints or ``final/``) is
  refused, never overwritten: start the new run in a new ``hydra.run.dir``.
- a path: a checkpoint directory (``.../checkpoints/step_000100``) or a run directory (its newest
  checkpoint). The run continues in the run directory that holds the checkpoint.

A resumed run is the same run: model, optimizer, scheduler, every RNG, the loop's own state (step,
data position, reference model, critic, KL controller: ``Trainer.state_dict``) and the MLflow run id
come back, rows of ``metrics.jsonl`` / ``samples.jsonl`` written after the checkpoint are dropped, and
on CPU the following steps reproduce the uninterrupted run's metrics bit for bit.

Around that (`start_run`, run before anything is written): a run directory is locked by one process
at a time; a finished run rerun with the same config says so and does nothing; a finished run rerun
with a larger ``trainer.steps`` is extended from its last checkpoint where that is exact (a constant
learning rate without warmup: every other schedule depends on ``trainer.steps`` from its first step);
a kill before the first checkpoint restarts the run under the same MLflow run id (`tracking.json`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

from rlx.checkpoint import CONFIG_NAME, check_safetensors, list_checkpoints, load_trainer_state
from rlx.distributed import env_world
from rlx.errors import RlxError
from rlx.tracking import flatten

# Settings a resumed run may change: where and how often it reports, not what it computes.
MAY_DIFFER = (
    "trainer.resume",
    "trainer.device",
    "trainer.parallel",  # h11: auto and ddp are the same under torchrun; the world size is checked
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.samples_every",
    "trainer.on_nonfinite",
    "trainer.max_nonfinite",
    "eval.batch_size",
    "logger.",
)


def find_checkpoint(resume: str | None, run_dir: Path) -> Path | None:
    """The checkpoint ``trainer.resume`` points at for a job whose run directory is ``run_dir``."""
    value = str(resume or "none")
    if value == "none":
        return None
    if value == "auto":
        found = list_checkpoints(run_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(value).expanduser()
    if not path.exists():
        raise RlxError(f"trainer.resume={value}: no such checkpoint or run directory")
    if (path / "trainer_state.pt").is_file():
        return path
    found = list_checkpoints(path / "checkpoints") or list_checkpoints(path)
    if not found:
        raise RlxError(f"trainer.resume={value}: no checkpoint there (no checkpoints/step_*)")
    return found[-1]


def run_dir_of(checkpoint: Path) -> Path:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/step_N``)."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """``key: saved -> current`` for every setting that differs and may not differ on resume.

    ``trainer.steps`` may grow where the longer run is exactly the one that was trained so far
    (`extendable`); otherwise its entry says why it may not.
    """
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_DIFFER) or a.get(key) == b.get(key):
            continue
        if key == "trainer.steps":
            why = extendable(saved, current)
            if why is None:
                continue
            out.append(f"trainer.steps: {a.get(key)!r} -> {b.get(key)!r} ({why})")
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


def extendable(saved: dict[str, Any], current: dict[str, Any]) -> str | None:
    """None when ``trainer.steps`` may grow on resume, else why not.

    Exact only for ``lr_schedule=constant`` with ``warmup_ratio=0``: every other transformers schedule
    (and any warmup, ``warmup_ratio * steps`` updates long) is a function of the total number of
    updates from the first one, so a run trained for N steps is not the first N steps of a longer one.
    """
    old, new = int(saved["trainer"]["steps"]), int(current["trainer"]["steps"])
    if new < old:
        return "a run cannot be shortened; its checkpoints are past that"
    t = current["trainer"]
    if t.get("lr_schedule") != "constant" or float(t.get("warmup_ratio") or 0) != 0:
        return (
            f"lr_schedule={t.get('lr_schedule')} with warmup_ratio={t.get('warmup_ratio')} depends on "
            "trainer.steps from the first step, so only a run with lr_schedule=constant and warmup_ratio=0 "
            "extends exactly; continue from its weights instead with model.init_from=<run>/final in a new "
            "hydra.run.dir"
        )
    return None


def load_for_resume(checkpoint: Path, cfg: dict[str, Any]) -> dict[str, Any]:
    """Read and check a checkpoint before anything is built: loadable, and from this config."""
    state = load_trainer_state(checkpoint)
    config_file = checkpoint / CONFIG_NAME
    if not config_file.is_file():
        raise RlxError(f"checkpoint {checkpoint} has no {CONFIG_NAME}; cannot tell which config it is from")
    try:
        saved = OmegaConf.to_container(OmegaConf.load(config_file), resolve=True)
    except Exception as exc:
        raise RlxError(f"checkpoint config {config_file} is unreadable ({exc})") from exc
    assert isinstance(saved, dict)
    diffs = config_differences(saved, cfg)
    if diffs:
        more = f" (and {len(diffs) - 3} more)" if len(diffs) > 3 else ""
        raise RlxError(
            f"checkpoint {checkpoint} is from a different config: {'; '.join(diffs[:3])}{more}; "
            f"start the new run in a new directory (hydra.run.dir={new_dir_for(run_dir_of(checkpoint))}) "
            "or resume with the same settings"
        )
    saved_world, (_, world_size, _) = int(state.get("world_size", 1)), env_world()
    if saved_world != world_size:  # h11: the batch split and every rank's RNG stream depend on it
        raise RlxError(
            f"checkpoint {checkpoint} was written by {saved_world} rank(s), this run has {world_size}; "
            f"resume with {saved_world} process(es) (torchrun --nproc_per_node={saved_world}), or start a "
            "new run from its weights with model.init_from=<checkpoint> in a new hydra.run.dir"
        )
    check_safetensors(checkpoint)  # a truncated model file is found before anything is written
    return state


def truncate_jsonl(path: Path, step: int) -> int:
    """Drop rows with ``step`` greater than ``step`` (written after the checkpoint); return how many.

    The file is rewritten atomically (temporary file + rename), so a crash here loses nothing.
    """
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a kill -9
            dropped += 1
            continue
        if int(row.get("step", 0)) > step:
            dropped += 1
        else:
            kept.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


def new_dir_for(run_dir: Path) -> Path:
    """A sibling of ``run_dir`` that does not exist yet, to suggest for a new run."""
    for i in range(2, 10_000):
        candidate = run_dir.with_name(f"{run_dir.name}-{i}")
        if not candidate.exists():
            return candidate
    return run_dir.with_name(f"{run_dir.name}-new")


def keep_first_row_at(path: Path, step: int) -> int:
    """Drop every row of ``metrics.jsonl`` at ``step`` after the first one: the first is the training
    row the checkpoint was written after; the others (the final evaluation) come again. Returns how
    many were dropped."""
    if not path.is_file():
        return 0
    kept, seen, dropped = [], False, 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            at = int(json.loads(line).get("step", 0))
        except (json.JSONDecodeError, ValueError, TypeError, AttributeError):
            dropped += 1
            continue
        if at == step:
            if seen:
                dropped += 1
                continue
            seen = True
        kept.append(line)
    if dropped:
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        tmp.replace(path)
    return dropped


LOCK_NAME = ".rlx.lock"


def lock_run_dir(run_dir: Path) -> FileLock:
    """Hold ``run_dir`` for this process (released when the run ends); a second process is refused."""
    lock = FileLock(str(run_dir / LOCK_NAME), timeout=0)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock.acquire()
    except Timeout as exc:
        raise RlxError(
            f"run directory {run_dir} is in use by another rlx process; wait for it to end, or start "
            f"this run elsewhere (hydra.run.dir={new_dir_for(run_dir)})"
        ) from exc
    except OSError as exc:
        raise RlxError(f"output directory {run_dir} is not writable ({exc.strerror or exc})") from exc
    return lock


def probe_lock(run_dir: Path) -> None:
    """Refuse now, writing nothing, when another process holds ``run_dir``."""
    if (run_dir / LOCK_NAME).is_file() and os.access(run_dir / LOCK_NAME, os.W_OK):
        lock_run_dir(run_dir).release()


@dataclass
class RunStart:
    """How a job starts in its run directory, decided before anything is written there."""

    run_dir: Path
    checkpoint: Path | None = None
    state: dict[str, Any] | None = None
    finished: dict[str, Any] | None = None  # the final metrics of a finished run: nothing to do
    mlflow_run_id: str | None = None  # the MLflow run to continue


def read_tracking(run_dir: Path) -> dict[str, Any]:
    try:
        info = json.loads((run_dir / "tracking.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _saved_config(file: Path) -> dict[str, Any] | None:
    try:
        saved = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except Exception:
        return None
    return saved if isinstance(saved, dict) else None


def _final_metrics(run_dir: Path) -> dict[str, Any]:
    """The last evaluation row of a finished run's metrics.jsonl."""
    out: dict[str, Any] = {}
    try:
        lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    except OSError:
        return out
    for line in reversed(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if any(str(k).startswith("eval/") for k in row):
            return {k: v for k, v in row.items() if k != "time"}
    return out


def target_run_dir(resume: str | None, run_dir: Path) -> Path:
    """The run directory a job works in: its own, or that of the checkpoint ``trainer.resume`` names."""
    value = str(resume or "none")
    if value in ("none", "auto"):
        return run_dir
    checkpoint = find_checkpoint(value, run_dir)
    return run_dir_of(checkpoint) if checkpoint is not None else run_dir


def start_run(cfg: dict[str, Any], run_dir: Path) -> RunStart:
    """Decide, reading only, how this job starts in ``run_dir``; refuse what would destroy a run.

    - trainer.resume=auto or a path, the directory's run FINISHED (``final/``) with this same config:
      nothing to do (`RunStart.finished`).
    - a checkpoint to resume from: it is read and checked (config, trainer state, model file sizes).
    - no checkpoint, but the directory holds a run (checkpoints or ``final/``): refused, whatever
      ``trainer.resume`` says; starting over must never overwrite another run.
    - no checkpoint, and a run killed before its first checkpoint with this same config: a fresh start
      that continues its MLflow run (from ``tracking.json``) instead of leaving it RUNNING forever.
    """
    t = cfg["trainer"]
    resume = str(t.get("resume") or "none")
    checkpoint = find_checkpoint(resume, run_dir)
    if checkpoint is not None:
        run_dir = run_dir_of(checkpoint)
    # a checkpoint named by path is read and checked first: a damaged one is reported even in a
    # finished run's directory (with auto, a finished run is done whatever its checkpoints hold)
    state = load_for_resume(checkpoint, cfg) if checkpoint is not None and resume != "auto" else None
    tracking = read_tracking(run_dir)
    final_cfg = _saved_config(run_dir / "final" / CONFIG_NAME) if (run_dir / "final").is_dir() else None
    if resume != "none" and tracking.get("status") == "FINISHED" and final_cfg is not None:
        if not config_differences(final_cfg, cfg) and final_cfg["trainer"]["steps"] == t["steps"]:
            return RunStart(run_dir, finished=_final_metrics(run_dir), mlflow_run_id=tracking.get("run_id"))
    if checkpoint is not None:
        return RunStart(run_dir, checkpoint, state or load_for_resume(checkpoint, cfg))
    held = list_checkpoints(run_dir / "checkpoints")
    if held or (run_dir / "final").is_dir():
        what = f"checkpoints up to {held[-1].name}" if held else "a final/ model"
        if resume == "none":
            why = "trainer.resume=none would start over in it"
        elif final_cfg is not None and config_differences(final_cfg, cfg):
            why = f"its config differs ({'; '.join(config_differences(final_cfg, cfg)[:2])})"
        else:
            why = "there is no checkpoint to continue it from (trainer.save_every=0)"
        raise RlxError(
            f"run directory {run_dir} holds a previous run ({what}) and {why}; it is left as it is: start "
            f"this run in a new directory (hydra.run.dir={new_dir_for(run_dir)})"
        )
    start = RunStart(run_dir)
    saved = _saved_config(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else None
    if (
        resume != "none"
        and tracking.get("run_id")
        and saved is not None
        and not config_differences(saved, cfg)
    ):
        start.mlflow_run_id = str(tracking["run_id"])  # killed before its first checkpoint: same MLflow run
    return start
