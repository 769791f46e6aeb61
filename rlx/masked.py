"""Masked reductions over ``[batch, time]`` tensors: the only reductions the loss code uses.

``mask`` is 1.0 for real completion tokens and 0.0 for padding and for anything after EOS. Masked-out
entries are replaced (not multiplied) before reducing, so a NaN or inf sitting in padding can never
leak into a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


def masked_sum(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Sum of ``x`` where ``mask`` is set."""
    x = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    """Mean of ``x`` over the masked entries (0 where there are none)."""
    count = mask.sum() if dim is None else mask.sum(dim)
    return masked_sum(x, mask, dim) / count.clamp(min=1)


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance over the masked entries; unbiased (n - 1) by default, 0 where fewer than 2 entries."""
    count = mask.sum() if dim is None else mask.sum(dim)
    mean = masked_mean(x, mask, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    sq = masked_sum(centred.square(), mask, dim)
    denom = (count - 1) if unbiased else count
    return torch.where(count > (1 if unbiased else 0), sq / denom.clamp(min=1), torch.zeros_like(sq))


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over all masked entries of the batch; masked entries come back as 0."""
    mean = masked_mean(x, mask)
    std = masked_var(x, mask).sqrt()
    out = (x - mean) / (std + eps) if shift_mean else x / (std + eps)
    return torch.where(mask.bool(), out, torch.zeros_like(out))
