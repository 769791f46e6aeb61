"""The optimizer and the one optimizer-step function every loop uses.

`optimizer_step` is the end of every update, online and offline: clip each optimizer's gradients,
check every gradient norm (``trainer.on_nonfinite``), step the optimizers and their schedulers, then
check that the weights are still finite (a finite gradient times a huge learning rate can still
make them inf: that stops the run whatever ``on_nonfinite`` says, since the step cannot be undone).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.optim.optimizer import ParamsT
from transformers import get_scheduler

from rlx.distributed import agree, all_reduce_gradients, clip_sharded_gradients, is_sharded
from rlx.errors import NonFiniteError
from rlx.registry import instantiate_checked

Optimizer = torch.optim.Optimizer


def make_optimizer(
    c: dict[str, Any], params: ParamsT, total_updates: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The configured optimizer (``optimizer._target_``) over ``params`` (parameters, or parameter
    groups with the same settings) and transformers' LR schedule."""
    t = c["trainer"]
    optimizer = instantiate_checked(c["optimizer"], where="optimizer", params=list(params), lr=float(t["lr"]))
    total_updates = max(int(total_updates), 1)
    schedule, extra = str(t["lr_schedule"]), {}
    if schedule == "cosine" and t["min_lr_ratio"] > 0:  # cosine decay to a floor
        schedule, extra = "cosine_with_min_lr", {"min_lr_rate": float(t["min_lr_ratio"])}
    scheduler = get_scheduler(
        schedule,
        optimizer,
        num_warmup_steps=int(t["warmup_ratio"] * total_updates),
        num_training_steps=total_updates,
        scheduler_specific_kwargs=extra,
    )
    return optimizer, scheduler


def optimizer_params(optimizer: Optimizer) -> list[torch.nn.Parameter]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def zero_grad(optimizers: Sequence[tuple[Optimizer, Any]]) -> None:
    for optimizer, _ in optimizers:
        optimizer.zero_grad(set_to_none=True)


def optimizer_step(
    optimizers: Sequence[tuple[Optimizer, Any]],
    *,
    grad_clip: float | None,
    guard: Any,
    step: int,
    names: Sequence[str] = ("gradient norm", "critic gradient norm"),
) -> float | None:
    """Clip, check, step. Returns the first optimizer's gradient norm before clipping, or None when
    a non-finite norm dropped this update (``trainer.on_nonfinite=skip``); the gradients are zeroed
    then and neither the weights nor the optimizers' moments are touched.

    ``optimizers`` are (optimizer, scheduler) pairs (the policy's first; a separate critic's next);
    ``guard`` is the run's `NonFiniteGuard`.
    """
    max_norm = grad_clip if grad_clip else float("inf")
    # h11: under trainer.parallel=ddp the ranks' accumulated gradients are summed here (each loss is
    # already divided by the global counts), so the norms, the guard's decision and the step agree;
    # under fsdp2 the sharded parameters' gradients were summed in backward (FSDP2's reduce-scatter)
    # and only the unsharded ones (a value head) are all-reduced here
    all_reduce_gradients(p for optimizer, _ in optimizers for p in optimizer_params(optimizer))
    norms = []
    for optimizer, _ in optimizers:
        params = [p for p in optimizer_params(optimizer) if p.grad is not None]
        if any(is_sharded(p) for p in params):  # fsdp2: the global norm of the shards (and the rest)
            norms.append(clip_sharded_gradients(params, max_norm))
        else:
            norms.append(float(torch.nn.utils.clip_grad_norm_(params, max_norm)))
    if not all(guard.ok(norm, name, step) for norm, name in zip(norms, names)):
        zero_grad(optimizers)
        return None
    guard.update_done()
    for optimizer, scheduler in optimizers:
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    check_finite_weights([p for optimizer, _ in optimizers for p in optimizer_params(optimizer)], step)
    return norms[0] if norms else 0.0


def check_finite_weights(params: Sequence[torch.nn.Parameter], step: int) -> None:
    """Raise `NonFiniteError` when a weight is NaN or inf after an optimizer step."""
    if not params:
        return
    sharded = any(is_sharded(p) for p in params)
    # fsdp2: each rank checks its own shards, and the ranks agree (one raising alone would leave the
    # others waiting in the next collective)
    local = [p.detach().to_local() if is_sharded(p) else p.detach() for p in params]
    norms = torch._foreach_norm(local)  # one fused pass, no big copy
    total = torch.stack([n.float() for n in norms]).sum()
    if agree(not bool(torch.isfinite(total))) if sharded else not torch.isfinite(total):
        raise NonFiniteError(
            f"the weights became non-finite after the optimizer step of iteration {step + 1} (the "
            "gradient was finite: is trainer.lr too large?)"
        )
