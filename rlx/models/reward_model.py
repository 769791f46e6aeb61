"""Reward models: a causal-LM trunk with a scalar head, read at the last real token.

A reward model is stored as a ``transformers`` sequence-classification checkpoint with
``num_labels = 1`` (``AutoModelForSequenceClassification``, the layout TRL's RewardTrainer writes)
plus its tokenizer, so any tool that reads those reads rlx's. rlx does not use the head's own
last-token lookup (which searches for the pad token and breaks when a completion contains it);
`reward_scores` reads the hidden state at the last position whose attention mask is 1, so left or
right padding give the same score.

The text a reward model sees is always built by `encode_for_reward`: the prompt text through the
tokenizer's template (for rlx's number tokenizer ``<bos> 3 1 0 2 <sep>``), then the completion text
without special tokens, then EOS. Training (``algo=rm``) and scoring (``reward=model``) both use it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GPT2ForSequenceClassification,
)

from rlx.errors import RlxError
from rlx.models.tokenizer import tiny_gpt2_config


class RewardModelHandle:
    """A sequence-classification reward model being trained (``algo=rm``) and its tokenizer; saves as
    a ``save_pretrained`` directory, as a `Policy` does."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def save(self, path: str | Path) -> None:
        self.model.save_pretrained(str(path), safe_serialization=True)
        self.tokenizer.save_pretrained(str(path))

    def after_sharding(self) -> None:
        """fsdp2 (h11g): `reward_scores` through the sharded root's hooks (`register_for_fsdp`)."""
        register_for_fsdp(self.model)


def encode_for_reward(
    tokenizer: Any, prompt_texts: list[str], completion_texts: list[str], *, max_length: int | None = None
) -> tuple[Tensor, Tensor]:
    """Right-padded ``[N, L]`` ids and attention mask of prompt + completion + EOS."""
    rows: list[list[int]] = []
    for prompt, completion in zip(prompt_texts, completion_texts):
        ids = tokenizer(prompt)["input_ids"] + tokenizer(completion, add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        rows.append(ids[:max_length] if max_length else ids)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    return input_ids, mask


def last_real_index(attention_mask: Tensor) -> Tensor:
    """Index of the last position whose mask is 1, whatever the padding side: ``[N, L] -> [N]``."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


SCORES_METHOD = "rlx_last_token_scores"  # fsdp2: `reward_scores` as a method of the sharded model (h11g)


def reward_scores(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """The scalar reward of each row, ``[N]``, read at its last real token (with gradient)."""
    head = getattr(model, "score", None)
    if head is None:
        raise RlxError(f"{type(model).__name__} has no scalar `score` head: not a reward model")
    method = model.__dict__.get(SCORES_METHOD)  # fsdp2: wrapped in the root unit's hooks
    if method is not None:
        return method(input_ids, attention_mask)
    return last_token_scores(model, input_ids, attention_mask)


def register_for_fsdp(model: Any) -> None:
    """fsdp2 (h11g): `reward_scores` runs ``model.base_model`` and ``model.score``, never ``model``'s own
    forward, so the root unit (embeddings, final norm, score head) would never gather its parameters
    nor reduce their gradients. ``last_token_scores`` becomes a method of the sharded model registered
    as an FSDP forward method (`torch.distributed.fsdp.register_fsdp_forward_method`: the root's
    pre/post-forward hooks around it), and `reward_scores` calls it."""
    import types

    from torch.distributed.fsdp import register_fsdp_forward_method

    setattr(model, SCORES_METHOD, types.MethodType(last_token_scores, model))
    register_fsdp_forward_method(model, SCORES_METHOD)


def last_token_scores(model: Any, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """`reward_scores`' computation: the trunk, then the score head at each row's last real token."""
    head = model.score
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = model.base_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids
    ).last_hidden_state
    last = last_real_index(attention_mask)
    return head(hidden[torch.arange(hidden.shape[0], device=hidden.device), last]).squeeze(-1)


def build_tiny_reward_model(
    tokenizer: Any, *, n_layer: int = 2, n_embd: int = 64, n_head: int = 4, n_positions: int = 64
) -> GPT2ForSequenceClassification:
    """A GPT-2 reward model built from a config (random init, dropout off) for ``tokenizer``."""
    cfg = tiny_gpt2_config(
        tokenizer, n_layer=n_layer, n_embd=n_embd, n_head=n_head, n_positions=n_positions, num_labels=1
    )
    return GPT2ForSequenceClassification(cfg)


def load_reward_model(path: str | Path) -> tuple[Any, Any]:
    """(model, tokenizer) from a reward-model directory, or one clear error saying what is wrong."""
    path = Path(path)
    if not path.is_dir():
        raise RlxError(f"reward model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise RlxError(f"{path} is not a save_pretrained directory (no config.json)")
    from transformers import AutoConfig

    try:  # trust_remote_code=False here and below: a directory's auto_map code is never run
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise RlxError(f"{path}: cannot read its model config: {str(exc).strip().splitlines()[0]}") from exc
    archs = getattr(config, "architectures", None) or []
    if getattr(config, "num_labels", None) != 1 or not any(
        a.endswith("ForSequenceClassification") for a in archs
    ):
        raise RlxError(
            f"{path} is not a reward model: expected a sequence-classification checkpoint with "
            f"num_labels=1, found architectures={archs} num_labels={getattr(config, 'num_labels', None)}"
        )
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path), trust_remote_code=False)
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise RlxError(f"{path}: cannot load the reward model: {str(exc).strip().splitlines()[0]}") from exc
    return model, tokenizer
