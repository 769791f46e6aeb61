"""Rollout: sample G completions per prompt and record what the update needs.

The old log-probs (pi_old = the policy that sampled) are recorded as each token is drawn
(`Policy.generate`, ``rollout.engine=hf``), so a batch costs no extra forward pass for them and no
``[N, T, V]`` logits are kept. Another engine (`rlx.rollout.engines`: vLLM) only returns token ids;
the policy then scores them (`recompute_old_logp`).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from torch import Tensor

from rlx.models import Policy, Sampling
from rlx.rollout.engines import RolloutEngine, recompute_old_logp
from rlx.tasks import PromptBatch


@dataclass
class Rollout:
    """N = groups * G sampled completions, grouped prompt-major, with ``[N, T]`` tensors."""

    batch: PromptBatch  # one row per completion (prompts repeated G times)
    prompt_ids: Tensor  # [N, P] left-padded
    prompt_mask: Tensor  # [N, P]
    tokens: Tensor  # [N, T]
    mask: Tensor  # [N, T] float: real completion tokens (through the first EOS)
    old_logp: Tensor  # [N, T] log pi_old(y_t), 0 on padding
    completions: list[Any]  # task-level completions (what rewards see)
    group_size: int
    prompt_texts: list[str]  # the prompts as the model saw them (before the tokenizer's template)
    completion_texts: list[str]  # the real completion tokens decoded, special tokens skipped

    def reward_columns(self) -> dict[str, list[Any]]:
        """The task's columns plus ``prompt_text`` and ``completion_text``, for rewards that read text
        (a learned reward model) rather than task objects."""
        return {
            **self.batch.columns,
            "prompt_text": self.prompt_texts,
            "completion_text": self.completion_texts,
        }

    @property
    def num_groups(self) -> int:
        return self.tokens.shape[0] // self.group_size

    def select_groups(self, groups: list[int]) -> Rollout:
        rows = [g * self.group_size + i for g in groups for i in range(self.group_size)]
        idx = torch.tensor(rows, dtype=torch.long, device=self.tokens.device)
        tensors = {
            f.name: getattr(self, f.name).index_select(0, idx)
            for f in fields(self)
            if isinstance(getattr(self, f.name), Tensor)
        }
        return replace(
            self,
            batch=self.batch.select(rows),
            completions=[self.completions[r] for r in rows],
            prompt_texts=[self.prompt_texts[r] for r in rows],
            completion_texts=[self.completion_texts[r] for r in rows],
            **tensors,
        )

    @staticmethod
    def concat(parts: list[Rollout]) -> Rollout:
        width = max(p.prompt_ids.shape[1] for p in parts)

        def left_pad(t: Tensor, value: float) -> Tensor:
            return torch.nn.functional.pad(t, (width - t.shape[1], 0), value=value)

        return Rollout(
            batch=PromptBatch.concat([p.batch for p in parts]),
            prompt_ids=torch.cat([left_pad(p.prompt_ids, 0) for p in parts]),
            prompt_mask=torch.cat([left_pad(p.prompt_mask, 0) for p in parts]),
            tokens=torch.cat([p.tokens for p in parts]),
            mask=torch.cat([p.mask for p in parts]),
            old_logp=torch.cat([p.old_logp for p in parts]),
            completions=[c for p in parts for c in p.completions],
            group_size=parts[0].group_size,
            prompt_texts=[t for p in parts for t in p.prompt_texts],
            completion_texts=[t for p in parts for t in p.completion_texts],
        )


def sample_groups(
    policy: Policy,
    prompts: PromptBatch,
    group_size: int,
    sampling: Sampling,
    engine: RolloutEngine | None = None,
    micro_batch_size: int | None = None,
) -> Rollout:
    """G sampled completions for each prompt, with their sampling-time log-probs: drawn by the policy
    itself (no ``engine``, or ``rollout.engine=hf``), or by ``engine`` and then scored by the policy in
    micro-batches of ``micro_batch_size`` (`recompute_old_logp`; also under ``trainer.precision=bf16``)."""
    ids, mask = policy.encode(prompts.prompts)
    ids = ids.repeat_interleave(group_size, dim=0)
    mask = mask.repeat_interleave(group_size, dim=0)
    sampler = policy.generate if engine is None else engine.generate
    tokens, comp_mask, sampled_logp = sampler(ids, mask, sampling)  # log-probs: 0 on padding, or None
    if sampled_logp is None or policy.autocast_dtype is not None:
        # pi_old scored by the policy: an engine's tokens came without log-probs (the engine's weights
        # were pushed from this policy), or trainer.precision=bf16, where a bf16 decode step and the bf16
        # full-sequence forward of the update round differently
        old_logp = recompute_old_logp(
            policy, ids, mask, tokens, comp_mask, sampling.temperature, micro_batch_size
        )
    else:
        old_logp = sampled_logp
    batch = prompts.repeat(group_size)
    return Rollout(
        batch=batch,
        prompt_ids=ids,
        prompt_mask=mask,
        tokens=tokens,
        mask=comp_mask,
        old_logp=old_logp,
        completions=policy.decode(tokens, comp_mask),
        group_size=group_size,
        prompt_texts=[policy.task.prompt_text(x) for x in batch.prompts],
        completion_texts=policy.decode_text(tokens, comp_mask),
    )
