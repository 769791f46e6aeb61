"""Resuming a run: find the checkpoint, check it belongs to this config, restore everything.

``trainer.resume``:

- ``auto`` (default): continue from the newest complete checkpoint in this job's run directory if
  there is one (rerun the same command with the same ``hydra.run.dir``, or relaunch a sweep with the
  same ``hydra.sweep.dir``), else start fresh.
- ``none``: always start fresh; an existing run directory's checkpoints are left alone.
- a path: a checkpoint directory (``.../checkpoints/step_000100``) or a run directory (its newest
  checkpoint). The run continues in the run directory that holds the checkpoint.

A resumed run is the same run: model, optimizer, scheduler, every RNG, the loop's own state (step,
data position, reference model, critic, KL controller: ``Trainer.state_dict``) and the MLflow run id
come back, rows of ``metrics.jsonl`` / ``samples.jsonl`` written after the checkpoint are dropped, and
on CPU the following steps reproduce the uninterrupted run's metrics bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from rlx.checkpoint import CONFIG_NAME, list_checkpoints, load_trainer_state
from rlx.errors import RlxError
from rlx.tracking import flatten

# Settings a resumed run may change: where and how often it reports, not what it computes.
MAY_DIFFER = (
    "trainer.resume",
    "trainer.device",
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
    """``key: saved -> current`` for every setting that differs and may not differ on resume."""
    a, b = flatten(saved), flatten(current)
    out = []
    for key in sorted(set(a) | set(b)):
        if key.startswith(MAY_DIFFER) or a.get(key) == b.get(key):
            continue
        out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
    return out


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
            "start a new run (trainer.resume=none) or resume with the same settings"
        )
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
