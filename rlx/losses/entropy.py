"""Per-token entropy of the policy, for the entropy bonus and the ``entropy`` metric."""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_ELEMENTS = 1 << 24  # logits per chunk (whole [T, V] rows): never a full [N, T, V] float32 copy


def token_entropy(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """H_t = -sum_v p_v log p_v of the temperature-scaled policy, ``[N, T, V] -> [N, T]`` (float32).

    Computed a few rows at a time (at most `CHUNK_ELEMENTS` logits) as ``logsumexp(z) - sum_v p_v z_v``
    with ``z = logits / tau``, so no full-vocabulary ``log_softmax`` copy of the whole batch is made;
    with gradient when the entropy bonus needs it.
    """
    rows = max(CHUNK_ELEMENTS // max(logits[0].numel(), 1), 1) if len(logits) else 1
    if logits.dim() >= 3 and logits.shape[0] > rows:
        # split, not slicing: a slice's backward allocates a zero tensor the size of all of `logits`
        return torch.cat([token_entropy(chunk, temperature) for chunk in logits.split(rows)])
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    p = torch.exp(z - lse)
    return lse.squeeze(-1) - (p * z).sum(-1)
