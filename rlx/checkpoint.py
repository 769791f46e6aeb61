"""Checkpoints: a ``save_pretrained`` directory plus the trainer's state.

``checkpoints/step_000120/`` holds the model (safetensors + config + tokenizer, loadable with
``AutoModelForCausalLM.from_pretrained`` / ``AutoTokenizer.from_pretrained``), ``rlx_config.yaml`` (the
run's composed config, so a checkpoint is self-describing) and ``trainer_state.pt`` (optimizer,
scheduler, step, RNG states). A checkpoint is written to a temporary sibling directory and renamed into
place, so an interruption never leaves a half-written ``step_*`` directory; the newest ``keep`` are kept.
Trainer state is read with ``torch.load(weights_only=True)``: nothing in a checkpoint is executed.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from safetensors import SafetensorError

from rlx.errors import RlxError
from rlx.models import Policy

TRAINER_STATE = "trainer_state.pt"
CONFIG_NAME = "rlx_config.yaml"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> tuple[str, torch.Tensor, int, int, float]:
    """numpy's global RNG state as plain values and a tensor, loadable with ``weights_only=True``."""
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)  # type: ignore[misc]
    return str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_model_dir(path: Path, policy: Policy, config_yaml: str) -> None:
    """A ``save_pretrained`` directory with the run's config beside the weights."""
    path.mkdir(parents=True, exist_ok=True)
    policy.save(path)
    if hasattr(policy, "write_generation_config"):  # h13: generation settings (a reward model has none)
        rollout = (yaml.safe_load(config_yaml) or {}).get("rollout") or {}
        policy.write_generation_config(path, rollout.get("max_new_tokens"))
    (path / CONFIG_NAME).write_text(config_yaml, encoding="utf-8")


def save_checkpoint(
    root: Path,
    step: int,
    policy: Policy,
    *,
    config_yaml: str,
    trainer_state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write ``root/step_{step:06d}`` atomically and prune all but the newest ``keep``.

    Everything goes to a hidden temporary sibling first, is flushed to disk, and is renamed into
    place; a failure while writing (a full disk) removes the temporary directory and leaves every
    earlier checkpoint as it was.
    """
    final = root / f"step_{step:06d}"
    tmp = root / f".{final.name}.tmp-{os.getpid()}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".step_*.tmp-*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        save_model_dir(tmp, policy, config_yaml)
        with (tmp / TRAINER_STATE).open("wb") as f:
            torch.save({**trainer_state, "step": step, "rng": rng_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        if final.exists():  # re-saving a step: swap, then drop the old copy
            old = root / f".{final.name}.old-{os.getpid()}"
            final.rename(old)
            tmp.rename(final)
            shutil.rmtree(old)
        else:
            tmp.rename(final)
    except (OSError, SafetensorError) as exc:  # safetensors reports a failed write as its own error
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(root)
        previous = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint"
        reason = getattr(exc, "strerror", None) or str(exc)
        raise RlxError(f"could not write checkpoint {final}: {reason}; {previous}") from exc
    if keep > 0:
        for stale in list_checkpoints(root)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    if not root.is_dir():
        return []
    return sorted(p for p in root.glob("step_*") if (p / TRAINER_STATE).is_file())


def load_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``, read with ``weights_only=True`` (no unpickling of
    arbitrary objects); a corrupt or truncated file is one clear error."""
    file = path / TRAINER_STATE
    if not file.is_file():
        raise RlxError(f"{path} is not an rlx checkpoint (no {TRAINER_STATE})")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise RlxError(f"checkpoint {file} is corrupt or truncated ({reason})") from exc
    if not isinstance(state, dict) or "step" not in state or "rng" not in state:
        raise RlxError(f"checkpoint {file} is not a complete rlx trainer state")
    return state


def load_model_weights(model: torch.nn.Module, path: Path) -> None:
    """Load a checkpoint's safetensors weights into an already built model, strictly.

    Read with safetensors (no pickle). Tied weights that ``save_pretrained`` stored once (GPT-2's
    ``lm_head`` and ``wte``) are restored through the tie. Missing files, corrupt files and shapes
    that do not match the configured model are one clear error.
    """
    from safetensors.torch import load_file

    files = sorted(path.glob("model*.safetensors"))  # the trunk (value heads etc. live in the loop state)
    if not files:
        raise RlxError(f"checkpoint {path} has no safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    try:
        for f in files:
            weights.update(load_file(f))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise RlxError(f"checkpoint weights in {path} are corrupt or truncated ({exc})") from exc
    own = model.state_dict()
    missing = [k for k in own if k not in weights and not _tied(model, k)]
    unexpected = [k for k in weights if k not in own]
    wrong = [k for k, v in weights.items() if k in own and own[k].shape != v.shape]
    if missing or unexpected or wrong:
        what = (
            f"shape of {wrong[0]}: {tuple(weights[wrong[0]].shape)} in the checkpoint, "
            f"{tuple(own[wrong[0]].shape)} in the model"
            if wrong
            else f"missing {missing[:3]}"
            if missing
            else f"unexpected {unexpected[:3]}"
        )
        raise RlxError(f"checkpoint {path} does not fit the configured model ({what})")
    model.load_state_dict(weights, strict=False)


def _tied(model: torch.nn.Module, key: str) -> bool:
    """True for a parameter that shares storage with another one (stored once on disk)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    ptr = params[key].data_ptr()
    return any(k != key and p.data_ptr() == ptr for k, p in params.items())


def resolve_model_dir(path: Path) -> Path:
    """A run directory's final model (or newest checkpoint), or a model directory itself."""
    if not path.exists():
        raise RlxError(f"{path} does not exist")
    if (path / CONFIG_NAME).is_file():
        return path
    if (path / "final" / CONFIG_NAME).is_file():
        return path / "final"
    checkpoints = list_checkpoints(path / "checkpoints")
    if checkpoints:
        return checkpoints[-1]
    raise RlxError(f"{path} is neither an rlx run directory nor a checkpoint (no {CONFIG_NAME} found)")
