"""``model=hf``: any causal LM that ``transformers`` loads, with its tokenizer (and chat template).

``model.name_or_path`` is a local ``save_pretrained`` directory or a hub id (read from the local cache
when the machine is offline). The tokenizer gets a pad token when it has none (its EOS, as TRL does)
and pads on the left, which `Policy` needs for sampling. With ``chat_template`` (the default) and a
tokenizer that has one, prompts go through ``apply_chat_template`` (one user turn, generation prompt
added), for sampling and for the offline losses alike.

LoRA (``model.lora.r > 0``) wraps the model with peft (the ``lora`` extra: ``pip install 'rlx[lora]'``);
only the adapters train, and ``final/`` and checkpoints hold the merged weights, so they load with
``AutoModelForCausalLM.from_pretrained`` like any other rlx model.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.errors import RlxError
from rlx.models.policy import Policy
from rlx.tasks import Task

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HFPolicy(Policy):
    """A `Policy` whose ``save`` merges LoRA adapters into the weights first."""

    def save(self, path: str | Path) -> None:
        model = self.model
        if hasattr(model, "merge_and_unload"):  # a peft model: save plain, merged weights
            model = copy.deepcopy(model).merge_and_unload()
        model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))


def _is_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def _offline() -> bool:
    return any(
        os.environ.get(k, "").lower() in ("1", "true", "yes")
        for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def _load_error(name: str, exc: Exception) -> RlxError:
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if _is_local(name):
        return RlxError(f"model.name_or_path={name}: cannot load a causal LM from this directory: {reason}")
    where = "the machine is offline (HF_HUB_OFFLINE)" if _offline() else "the hub could not be reached"
    return RlxError(
        f"model.name_or_path={name} is not a local directory and is not in the Hugging Face cache, and "
        f"{where}; download it first (huggingface-cli download {name}) or pass a local directory "
        f"({reason})"
    )


def apply_lora(model: Any, lora: dict[str, Any]) -> Any:
    """Wrap ``model`` with LoRA adapters (peft), or fail in one line when peft is missing."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError as exc:
        raise RlxError("model.lora.r > 0 needs peft: pip install 'rlx[lora]' (or pip install peft)") from exc
    targets = lora.get("target_modules")
    config = LoraConfig(
        r=int(lora["r"]),
        lora_alpha=int(lora.get("alpha", 16)),
        lora_dropout=float(lora.get("dropout", 0.0)),
        target_modules=list(targets) if targets else "all-linear",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise RlxError(f"model.lora: {str(exc).splitlines()[0]}") from exc


def build_hf(
    task: Task,
    *,
    name_or_path: str = "???",
    dtype: str = "float32",
    chat_template: bool = True,
    trust_remote_code: bool = False,
    revision: str | None = None,
    lora: dict[str, Any] | None = None,
    init_from: str | None = None,
) -> HFPolicy:
    """Load ``name_or_path`` (or ``init_from``, a run's saved model) as a policy for ``task``."""
    source = str(init_from or name_or_path)
    if source in ("???", "", "None"):
        raise RlxError("model=hf needs model.name_or_path=<local directory or hub id>")
    if dtype not in DTYPES:
        raise RlxError(f"model.dtype={dtype!r}; one of {', '.join(DTYPES)}")
    if _is_local(source) and not Path(source).expanduser().is_dir():
        raise RlxError(f"model.name_or_path={source}: no such directory")
    kwargs: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(source, dtype=DTYPES[dtype], **kwargs)
    except (OSError, ValueError) as exc:
        raise _load_error(source, exc) from exc
    if tokenizer.pad_token is None:  # GPT-2, OPT-style tokenizers without one: pad with EOS (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    tokenizer.padding_side = "left"
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if lora and int(lora.get("r") or 0) > 0:
        model = apply_lora(model, lora)
    policy = HFPolicy(model, tokenizer, task, "hf")
    policy.chat_template = bool(chat_template and getattr(tokenizer, "chat_template", None))
    if getattr(task, "chat", False) and not getattr(tokenizer, "chat_template", None):
        raise RlxError(
            f"task={task.name} has chat prompts (message lists or task.system_prompt) but the tokenizer of "
            f"{source} has no chat template"
        )
    return policy


def build_char_gpt(
    task: Task,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 128,
    chat_template: bool = True,
    init_from: str | None = None,
) -> HFPolicy:
    """A GPT-2 built from a config (random init, dropout off) with a character-level tokenizer that
    has a chat template (`rlx.models.tokenizer.build_char_tokenizer`): a text model small enough to
    train on a CPU in minutes (``experiment=arithmetic_r1``). ``init_from`` loads a saved one."""
    from transformers import GPT2LMHeadModel

    from rlx.models.tokenizer import build_char_tokenizer, tiny_gpt2_config

    if init_from:
        return build_hf(task, name_or_path=str(init_from), chat_template=chat_template)
    if n_embd % n_head:
        raise RlxError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
    tokenizer = build_char_tokenizer()
    cfg = tiny_gpt2_config(tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)
    policy = HFPolicy(GPT2LMHeadModel(cfg), tokenizer, task, "char_gpt")
    policy.chat_template = bool(chat_template)
    return policy
