"""Models: builders for the ``model`` config group, each returning a `Policy`.

A model YAML names its builder with Hydra's ``_target_``; the other keys are the builder's keyword
arguments, checked against its signature at start-up. ``init_from`` loads a ``save_pretrained``
directory (an rlx checkpoint or any local causal LM with its tokenizer) instead of a fresh init.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2LMHeadModel
from transformers.utils import logging as hf_logging

from rlx.errors import RlxError
from rlx.models.policy import Policy, Sampling, token_logp
from rlx.models.tiny_policy import TinyPolicyConfig, TinyPolicyModel
from rlx.models.tokenizer import build_number_tokenizer, tiny_gpt2_config
from rlx.models.toy_sort import ToySortConfig, ToySortModel
from rlx.registry import instantiate_checked
from rlx.tasks import Task

__all__ = [
    "Policy",
    "Sampling",
    "build_model",
    "build_reward_model",
    "context_length",
    "load_pretrained",
    "token_logp",
]

hf_logging.disable_progress_bar()  # rlx shows its own progress; HF's bars would interleave


class _DropPaddingHint(logging.Filter):
    """generate() warns about a missing attention mask when a policy *samples* the pad token in its
    decoding steps; rlx always passes the prompt's mask and masks completions by EOS, so the hint
    is noise here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "strongly recommend passing in an `attention_mask`" not in record.getMessage()


hf_logging.get_logger("transformers").addFilter(_DropPaddingHint())
hf_logging.get_logger("transformers.modeling_utils").addFilter(_DropPaddingHint())


def _number_task(task: Task, model: str) -> tuple[int, int]:
    if not hasattr(task, "vocab") or not hasattr(task, "length"):
        raise RlxError(f"model={model} works on integer tasks (task=sort); task={task.name} is not one")
    return int(task.vocab), int(task.length)


def load_pretrained(path: str | Path, task: Task, name: str) -> Policy:
    """A policy from a ``save_pretrained`` directory (model + tokenizer)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise RlxError(f"{path} is not a save_pretrained model directory (no config.json)")
    archs = json.loads((path / "config.json").read_text(encoding="utf-8")).get("architectures") or []
    if any(str(a).endswith("ForSequenceClassification") for a in archs):
        # AutoModelForCausalLM would load the trunk and invent a random LM head without a word
        raise RlxError(f"{path} is a reward model ({archs[0]}), not a causal LM policy")
    try:  # trust_remote_code=False: code in a directory (config.json's auto_map) is never run
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise RlxError(f"{path}: cannot load a causal LM from this directory: {reason}") from exc
    return Policy(model, tokenizer, task, name)


def build_toy_sort(task: Task, *, embedding_dim: int = 10, init_from: str | None = None) -> Policy:
    """The lecture's per-position model (`rlx.models.toy_sort`)."""
    if init_from:
        return load_pretrained(init_from, task, "toy_sort")
    vocab, length = _number_task(task, "toy_sort")
    if embedding_dim < 1:
        raise RlxError(f"model.embedding_dim must be positive, got {embedding_dim}")
    cfg = ToySortConfig(
        vocab_size=vocab, embedding_dim=embedding_dim, prompt_length=length, response_length=length
    )
    return Policy(ToySortModel(cfg), build_number_tokenizer(vocab, specials=False), task, "toy_sort")


def build_tiny_policy(task: Task, *, hidden_size: int = 16, init_from: str | None = None) -> Policy:
    """Seed 001's embedding + linear head (`rlx.models.tiny_policy`)."""
    if init_from:
        return load_pretrained(init_from, task, "tiny_policy")
    vocab, _ = _number_task(task, "tiny_policy")
    cfg = TinyPolicyConfig(vocab_size=vocab, hidden_size=hidden_size)
    return Policy(TinyPolicyModel(cfg), build_number_tokenizer(vocab, specials=False), task, "tiny_policy")


def build_tiny_gpt(
    task: Task,
    *,
    n_layer: int = 4,
    n_embd: int = 64,
    n_head: int = 4,
    n_positions: int = 64,
    init_from: str | None = None,
) -> Policy:
    """A GPT-2 built from a config (random init) with rlx's number tokenizer.

    Dropout is 0: RL compares log-probs of the same tokens across forward passes (old vs new), and
    dropout noise would show up as spurious ratios (TRL's ``disable_dropout`` for the same reason).
    """
    if init_from:
        return load_pretrained(init_from, task, "tiny_gpt")
    vocab, length = _number_task(task, "tiny_gpt")
    if n_embd % n_head:
        raise RlxError(f"model.n_embd={n_embd} must be divisible by model.n_head={n_head}")
    tokenizer = build_number_tokenizer(vocab, specials=True)
    needed = length + 2 + task.max_new_tokens
    if needed > n_positions:
        raise RlxError(f"model.n_positions={n_positions} is too small for {needed} tokens")
    cfg = tiny_gpt2_config(tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions)
    return Policy(GPT2LMHeadModel(cfg), tokenizer, task, "tiny_gpt")


def context_length(model: Any) -> int | None:
    """The most positions ``model`` reads (``n_positions`` for GPT-2, ``max_position_embeddings`` for
    most others), or None when its config names no limit (rlx's toy models)."""
    config = getattr(model, "config", None)
    for key in ("n_positions", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def build_model(node: dict[str, Any], task: Task) -> Policy:
    """Instantiate the ``model`` config node (``_target_`` + keyword arguments) for ``task``."""
    return instantiate_checked(node, where="model", task=task)


def build_reward_model(node: dict[str, Any], task: Task) -> tuple[Any, Any]:
    """(sequence-classification model with ``num_labels=1``, tokenizer) for ``algo=rm``.

    From ``model.init_from`` (e.g. the SFT run's ``final/``, seed 003's recipe) or ``model=hf``'s
    ``name_or_path``: the causal LM's trunk with a fresh scalar head (``AutoModelForSequenceClassification``
    drops the LM head). Otherwise, for ``model=tiny_gpt``, a GPT-2 reward model of the same size built from
    a config (`rlx.models.reward_model.build_tiny_reward_model`).
    """
    from transformers import AutoModelForSequenceClassification

    from rlx.models.reward_model import build_tiny_reward_model

    source = node.get("init_from") or node.get("name_or_path")
    if source:
        policy = build_model(node, task)  # the same loading path and checks as a policy
        tokenizer = policy.tokenizer
        path = str(source)
        prev = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # "score.weight newly initialized" is the point here
        try:
            model = AutoModelForSequenceClassification.from_pretrained(
                path, num_labels=1, pad_token_id=tokenizer.pad_token_id, trust_remote_code=False
            )
        except (OSError, ValueError) as exc:
            raise RlxError(f"cannot build a reward model from {path}: {str(exc).splitlines()[0]}") from exc
        finally:
            hf_logging.set_verbosity(prev)
        del policy
        return model, tokenizer
    if node.get("name") != "tiny_gpt":
        raise RlxError(
            f"algo=rm builds a reward model from model=tiny_gpt, model=hf or model.init_from=DIR; "
            f"model={node.get('name')} has no sequence-classification form"
        )
    policy = build_model(node, task)
    sizes = {k: int(node[k]) for k in ("n_layer", "n_embd", "n_head", "n_positions") if k in node}
    return build_tiny_reward_model(policy.tokenizer, **sizes), policy.tokenizer
