"""What a run is called and what it is tagged with, in MLflow and in its run directory.

- The name says what ran: ``{algo}-{reward or data}-s{seed}``, plus the swept overrides of a sweep job
  (``grpo-sort-s0-lr=0.001``); ``logger.run_name`` replaces the first part. rlx always names its
  runs: MLflow's random names are drawn from Python's global ``random``, which the training seed
  sets, so every run with the same seed used to get the same random name.
- Tags: rlx's own (algo, model, task, reward, seed, overrides, run_dir) and MLflow's standard ones
  (``mlflow.user``, ``mlflow.source.name``/``type`` from MLflow's own run-context providers,
  ``mlflow.source.git.commit``/``branch`` of the directory rlx was launched from,
  ``mlflow.parentRunId`` for a sweep job).
- A sweep's directory holds ``rlx_sweep.json`` (written by `rlx.sweeps.SweepCallback` before the
  first job starts): the parent MLflow run and the swept keys, so jobs find their parent through
  the file system whatever launcher runs them (basic, joblib, submitit).
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

SWEEP_FILE = "rlx_sweep.json"
# Keys already in the name's first part: not repeated in a sweep job's suffix.
NAMED_KEYS = ("algo", "trainer.seed", "reward", "data.train", "logger.run_name")


def subject(c: Mapping[str, Any]) -> str:
    """What the run learns from: the data file of an offline algo, else the reward's name."""
    algo = c.get("algo") or {}
    data = c.get("data") or {}
    if str(algo.get("loop") or "online") == "offline" and data.get("train"):
        return Path(str(data["train"]).rstrip("/")).stem or str(data["train"])
    return str((c.get("reward") or {}).get("name") or "run")


def _short_value(value: str) -> str:
    """``0.0012345678 -> 0.001235``; other values as given."""
    try:
        number = float(value)
    except ValueError:
        return value
    return value if value.lstrip("-").isdigit() else f"{number:.4g}"


def sweep_suffix(overrides: list[str], swept: list[str]) -> str:
    """``trainer.lr=0.001 algo.epochs=2`` -> ``lr=0.001-epochs=2`` for the keys that were swept."""
    parts = []
    for ov in overrides:
        key, _, value = ov.lstrip("+~").partition("=")
        if key in swept and key not in NAMED_KEYS:
            parts.append(f"{key.rpartition('.')[2]}={_short_value(value)}")
    return "-".join(parts)


def run_name(c: Mapping[str, Any], overrides: list[str] | None = None, swept: list[str] | None = None) -> str:
    """``{algo}-{reward or data}-s{seed}[-{swept overrides}]``, or ``logger.run_name`` in its place."""
    logger = c.get("logger") or {}
    seed = (c.get("trainer") or {}).get("seed")
    base = logger.get("run_name") or f"{(c.get('algo') or {}).get('name')}-{subject(c)}-s{seed}"
    suffix = sweep_suffix(list(overrides or []), list(swept or []))
    return f"{base}-{suffix}" if suffix else str(base)


def git_info(path: Path) -> dict[str, str]:
    """MLflow's git tags for the repository holding ``path`` (none outside a repository).

    Asked of the ``git`` command directly: MLflow's own git context needs GitPython, which rlx does
    not depend on, and it looks at the entry script's repository, not the directory a run started in.
    """

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", "-C", str(path), *args], capture_output=True, text=True, timeout=5, check=False
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return {}
    tags = {"mlflow.source.git.commit": commit}
    branch = git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    status = git("status", "--porcelain", "--untracked-files=no")
    if status is not None:
        tags["mlflow.source.git.dirty"] = str(bool(status)).lower()
    return tags


def source_tags(launch_dir: Path) -> dict[str, str]:
    """``mlflow.user`` and ``mlflow.source.*`` as MLflow's own run-context providers see this process
    (its git provider skipped, see `git_info`), the source named ``rlx train``, and git tags."""
    tags: dict[str, str] = {}
    try:
        from mlflow.tracking.context.git_context import GitRunContext
        from mlflow.tracking.context.registry import resolve_tags

        tags.update({k: str(v) for k, v in resolve_tags(ignore=[GitRunContext]).items()})
    except Exception:  # a context provider that fails must not stop a run
        import getpass

        tags["mlflow.user"] = getpass.getuser()
    tags["mlflow.source.name"] = "rlx train"
    tags.update(git_info(launch_dir))
    return tags


def run_tags(
    c: Mapping[str, Any], *, run_dir: Path, overrides: list[str], launch_dir: Path
) -> dict[str, str]:
    """Every tag of a training run but the parent's (see `read_sweep`)."""
    return {
        "algo": str((c.get("algo") or {}).get("name")),
        "model": str((c.get("model") or {}).get("name")),
        "task": str((c.get("task") or {}).get("name")),
        "reward": str((c.get("reward") or {}).get("name")),
        "seed": str((c.get("trainer") or {}).get("seed")),
        "run_dir": str(run_dir.resolve()),
        "overrides": " ".join(overrides)[:5000],
        **source_tags(launch_dir),
    }


def read_sweep(sweep_dir: Path) -> dict[str, Any]:
    """The sweep's ``rlx_sweep.json`` (parent run, swept keys), or {} when there is none."""
    try:
        info = json.loads((sweep_dir / SWEEP_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def write_sweep(sweep_dir: Path, info: Mapping[str, Any]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    tmp = sweep_dir / f".{SWEEP_FILE}.tmp"
    tmp.write_text(json.dumps(dict(info), indent=1) + "\n", encoding="utf-8")
    tmp.replace(sweep_dir / SWEEP_FILE)
