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


def _fsync(path: Path) -> None:
    """Flush a file or a directory (its entries: a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_model_dir(path: Path, policy: Policy, config_yaml: str) -> None:
    """Write the model, tokenizer and config into ``path`` and flush every file to disk."""
    path.mkdir(parents=True, exist_ok=True)
    policy.save(path)
    if hasattr(policy, "write_generation_config"):  # h13: generation settings (a reward model has none)
        rollout = (yaml.safe_load(config_yaml) or {}).get("rollout") or {}
        policy.write_generation_config(path, rollout.get("max_new_tokens"))
    (path / CONFIG_NAME).write_text(config_yaml, encoding="utf-8")
    for f in path.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(path)


# What a failed write raises: the OS (a full disk: ENOSPC, a file-size limit: EFBIG), safetensors (its
# own error type) and torch.save (RuntimeError from its zip writer: "PytorchStreamWriter failed ...").
WRITE_ERRORS = (OSError, SafetensorError, RuntimeError)


def _write_reason(exc: BaseException, where: Path) -> str:
    reason = getattr(exc, "strerror", None)
    if reason:
        return str(reason)
    # torch.save's zip writer says only "unexpected pos ..." when a write comes up short: add what
    # the filesystem has left, which is what a user needs to know
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return f"the write failed ({first})"
    return f"the write failed ({first}); {free // 1024} KiB free on that filesystem"


def _swap_into_place(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` directory to ``final`` (an existing ``final`` is replaced), flushed."""
    if final.exists():  # re-saving: swap, then drop the old copy
        old = final.parent / f".{final.name}.old-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old)
    else:
        tmp.rename(final)
    _fsync(final.parent)


def save_model_dir(path: Path, policy: Policy, config_yaml: str) -> None:
    """A ``save_pretrained`` directory with the run's config beside the weights, written atomically.

    Everything goes to a hidden temporary sibling, is flushed to disk, and is renamed into place, so a
    kill never leaves a half-written ``final/``; a failed write (a full disk) removes the temporary
    directory and is one clear error.
    """
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a process killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        _write_model_dir(tmp, policy, config_yaml)
        _swap_into_place(tmp, path)
    except WRITE_ERRORS as exc:
        reason = _write_reason(exc, path.parent)  # before the partial write is removed
        shutil.rmtree(tmp, ignore_errors=True)
        raise RlxError(f"could not write {path}: {reason}") from exc


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
        _write_model_dir(tmp, policy, config_yaml)
        with (tmp / TRAINER_STATE).open("wb") as f:
            torch.save({**trainer_state, "step": step, "rng": rng_state()}, f)
            f.flush()
            os.fsync(f.fileno())
        _fsync(tmp)
        _swap_into_place(tmp, final)
    except WRITE_ERRORS as exc:
        reason = _write_reason(exc, root)  # before the partial write is removed
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(root)
        previous = f"the previous checkpoint {kept[-1]} is intact" if kept else "no earlier checkpoint"
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


def check_safetensors(path: Path) -> None:
    """Every ``model*.safetensors`` of ``path`` is complete: its header parses and its file is as long
    as the header says. Read without loading a tensor, so resuming a large model finds a truncated
    file before anything of the run is touched (safetensors itself only fails when loading)."""
    import json
    import struct

    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise RlxError(f"checkpoint {path} has no safetensors weights")
    for f in files:
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n)) if n < 100_000_000 else None
            ends = [v["data_offsets"][1] for k, v in (header or {}).items() if k != "__metadata__"]
            complete = header is not None and f.stat().st_size >= 8 + n + max(ends, default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
            complete = False
        if not complete:
            raise RlxError(f"checkpoint weights {f} are corrupt or truncated")


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
    from rlx import distributed

    if distributed.fsdp_modules(model):  # h11f: fsdp2 keeps shards: every rank takes its part of the whole
        distributed.load_full_state_dicts(model, weights)
    else:
        model.load_state_dict(weights, strict=False)


def _tied(model: torch.nn.Module, key: str) -> bool:
    """True for a parameter that shares storage with another one (stored once on disk)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if key not in params:
        return False
    ptr = params[key].data_ptr()
    return any(k != key and p.data_ptr() == ptr for k, p in params.items())


# The config groups whose ``_target_`` a directory's config may name: only rlx's own builders, looked
# up by the node's ``name`` in the packaged ``conf/<group>/<name>.yaml``.
TRUSTED_GROUPS = ("task", "model")


def packaged_node(group: str, name: str) -> dict[str, Any] | None:
    """The packaged ``conf/<group>/<name>.yaml`` of rlx (from the installed ``rlx.conf``), or None."""
    from importlib import resources

    from omegaconf import OmegaConf

    if not isinstance(name, str) or not name.replace("_", "").isalnum():
        return None
    entry = resources.files("rlx.conf").joinpath(group, f"{name}.yaml")
    if not entry.is_file():
        return None
    node = OmegaConf.to_container(OmegaConf.create(entry.read_text(encoding="utf-8")), resolve=False)
    return node if isinstance(node, dict) else None


def read_dir_config(
    model_dir: Path, *, reward_fn: str | None = None, use_reward: bool = True
) -> dict[str, Any]:
    """A model or checkpoint directory's ``rlx_config.yaml``, made safe to build from.

    Directories come from other people, so nothing named in the file is imported: ``task`` and
    ``model`` are rebuilt only through rlx's own builders, found by their ``name`` in the packaged
    config groups (a ``_target_`` that differs from the packaged one is refused, not imported);
    ``model.trust_remote_code`` is forced off; the optimizer is dropped (evaluation and sampling build
    none); ``reward=custom`` names user code, so its ``reward.fn`` is taken only from the command line
    (``reward_fn``), never from the file. Anything else in the file is data, checked by `rlx.train.plan`.
    """
    from omegaconf import OmegaConf

    file = model_dir / CONFIG_NAME
    try:
        cfg = OmegaConf.to_container(OmegaConf.load(file), resolve=True)
    except Exception as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise RlxError(f"{file} is not a readable rlx config ({reason})") from exc
    if not isinstance(cfg, dict) or not all(
        isinstance(cfg.get(k), dict) for k in ("task", "model", "reward")
    ):
        raise RlxError(f"{file} is not an rlx run config (no task, model and reward sections)")
    for group in TRUSTED_GROUPS:
        node = cfg[group]
        name = node.get("name")
        packaged = packaged_node(group, name) if isinstance(name, str) else None
        if packaged is None:
            raise RlxError(
                f"{file}: {group}.name={name!r} is not one of rlx's {group}s; refusing to build it"
            )
        target = node.get("_target_", packaged["_target_"])
        if target != packaged["_target_"]:
            raise RlxError(
                f"{file}: {group}._target_={target!r} is not rlx's {packaged['_target_']} for "
                f"{group}={name}; a directory's config may only name rlx's own {group}s (nothing in it "
                "is imported)"
            )
        node["_target_"] = packaged["_target_"]
    if "trust_remote_code" in cfg["model"]:
        cfg["model"]["trust_remote_code"] = False
    cfg.pop("optimizer", None)
    if cfg["reward"].get("name") == "custom" and not use_reward:  # `rlx sample`: the reward is not used
        cfg["reward"]["fn"] = None
    elif cfg["reward"].get("name") == "custom":
        if not reward_fn:
            raise RlxError(
                f"{file} uses reward=custom (reward.fn={cfg['reward'].get('fn')!r}): user code is never "
                "imported from a directory's config; pass it yourself with --reward-fn MODULE:FUNCTION"
            )
        cfg["reward"]["fn"] = reward_fn
    elif reward_fn:
        raise RlxError(f"--reward-fn: {file} uses reward={cfg['reward'].get('name')}, not reward=custom")
    return cfg


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
