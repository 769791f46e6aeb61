"""Per-token entropy of the policy, for the entropy bonus and the ``entropy`` metric."""

from __future__ import annotations

import torch
from torch import Tensor


def token_entropy(logits: Tensor) -> Tensor:
    """H_t = -sum_v p_v log p_v over the vocabulary, ``[N, T, V] -> [N, T]``."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)
