"""Data parallelism under torchrun, from torch.distributed itself (``trainer.parallel``).

``trainer.parallel``: ``auto`` (``ddp`` under torchrun, ``none`` in a plain process), ``none`` or
``ddp``. Under ``ddp`` every rank holds a full copy of the model, samples (or reads) its share of one
global batch, and the ranks agree on everything that decides the update:

- gradients are summed over ranks after each backward pass (`all_reduce_gradients`), and every loss is
  normalised by the *global* token / sequence counts (`all_reduce_sum`), so a global batch split over
  ranks gives the update one process gives on the whole batch (verl's fix of per-rank token means);
- batch statistics (whitening, batch_std, the KL controller's measurement, logged means) are computed
  over the gathered batch (`gather_rows`);
- every decision that changes control flow (a non-finite loss, the KL early stop, TRPO's line search,
  a stop signal) is agreed by an all-reduce (`agree`), so no rank waits in a collective the others
  skipped.

Every helper is a no-op (returns its input) in a single process, so the loops call them unconditionally.

Why rlx all-reduces gradients itself instead of wrapping the model in
``torch.nn.parallel.DistributedDataParallel``: DDP synchronises only the backward of its wrapper's own
``forward``, while rlx's policy reaches its model through ``generate``, submodule calls (the chunked
log-prob path) and ``torch.autograd.grad`` (TRPO's gradient and Fisher-vector products), none of which
DDP sees; rlx also accumulates micro-batches and would need ``no_sync`` on all but the last. One
bucketed ``all_reduce`` of the accumulated gradients before the optimizer step is what DDP computes
(a sum, here, since the losses are already divided by global counts), with no overlap of communication
and backward: fine for the models rlx trains on one node, a cost for large ones.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from rlx.errors import RlxError

TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
PARALLEL_MODES = ("auto", "none", "ddp", "fsdp2")
# How long a collective waits for the other ranks before the process group gives up (and the rank
# raises): a rank that died or hangs ends the others within this bound, besides torchrun's own
# teardown of the worker group. RLX_DIST_TIMEOUT_S overrides it (seconds).
DEFAULT_TIMEOUT_S = 600.0
BUCKET_ELEMENTS = 2**24  # gradient all-reduce buckets: 64 MiB of float32


def under_torchrun() -> bool:
    """True when torchrun's (or SLURM-derived) environment is present: RANK, WORLD_SIZE, LOCAL_RANK,
    MASTER_ADDR and MASTER_PORT."""
    return all(os.environ.get(k) not in (None, "") for k in TORCHRUN_VARS)


def resolve_parallel(setting: str) -> str:
    """``trainer.parallel`` checked and resolved: ``none`` or ``ddp``."""
    setting = str(setting)
    if setting not in PARALLEL_MODES:
        raise RlxError(f"trainer.parallel={setting!r} is not one of {', '.join(PARALLEL_MODES)}")
    if setting == "fsdp2":
        raise RlxError("trainer.parallel=fsdp2 is not built yet in rlx; use trainer.parallel=ddp")
    if setting == "auto":
        return "ddp" if under_torchrun() else "none"
    if setting == "ddp" and not under_torchrun():
        missing = [k for k in TORCHRUN_VARS if not os.environ.get(k)]
        raise RlxError(
            f"trainer.parallel=ddp needs torchrun's environment ({', '.join(missing)} not set); start "
            "with `torchrun --nproc_per_node=N -m rlx.cli train ...` or use trainer.parallel=none"
        )
    if setting == "none" and under_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        raise RlxError(
            f"trainer.parallel=none under torchrun with WORLD_SIZE={os.environ['WORLD_SIZE']}: the ranks "
            "would train separately into one run directory; use trainer.parallel=ddp (or auto)"
        )
    return setting


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the environment; (0, 1, 0) in a plain process."""
    return (
        int(os.environ.get("RANK") or 0),
        int(os.environ.get("WORLD_SIZE") or 1),
        int(os.environ.get("LOCAL_RANK") or 0),
    )


def check_divides(world_size: int, count: int, what: str) -> None:
    """Refuse a batch the ranks cannot split evenly."""
    if count % world_size:
        raise RlxError(
            f"{what}={count} is not divisible by the world size {world_size}: each of the {world_size} "
            "ranks takes an equal share of the global batch"
        )


def setup(parallel: str, device: torch.device) -> torch.device:
    """Join the process group (``ddp``): gloo on CPU, nccl on CUDA with this rank on
    ``cuda:LOCAL_RANK``. Returns the device this rank computes on. Idempotent."""
    mode = resolve_parallel(parallel)
    if mode == "none":
        return device
    _, world_size, local_rank = env_world()
    if device.type == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise RlxError(
                f"trainer.parallel=ddp on CUDA (nccl) needs a GPU for local rank {local_rank}; torch sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: use trainer.device=cpu "
                "(gloo) or fewer processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise RlxError(f"trainer.parallel=ddp supports cpu (gloo) and cuda (nccl), not {device.type}")
    if not dist.is_initialized():
        timeout = timedelta(seconds=float(os.environ.get("RLX_DIST_TIMEOUT_S", DEFAULT_TIMEOUT_S)))
        kwargs: dict[str, Any] = {"device_id": device} if backend == "nccl" else {}
        dist.init_process_group(backend, timeout=timeout, **kwargs)
    if dist.get_world_size() != world_size:  # pragma: no cover - torchrun sets both
        raise RlxError(f"the process group has {dist.get_world_size()} ranks, WORLD_SIZE says {world_size}")
    return device


def peer_failure(exc: BaseException) -> str | None:
    """One line for a collective that failed because another rank ended (it printed its own error),
    else None. gloo says "Connection closed by peer"; torch raises DistError for the rest."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if not (dist.is_available() and dist.is_initialized()):
        return None
    if isinstance(exc, dist.DistError) or "closed by peer" in text or "Connection reset" in text:
        return f"rank {dist.get_rank()}: another rank ended, so this one stops too ({text[:160]})"
    return None


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world() -> tuple[int, int]:
    """(rank, world size) of the process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _device() -> torch.device:
    """Where collectives of small values run: this rank's GPU under nccl, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(x: float) -> float:
    """The sum of ``x`` over ranks (float64, so token counts stay exact)."""
    if not active():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item())


def all_reduce_max(x: float) -> float:
    if not active():
        return x
    t = torch.tensor([float(x)], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def all_reduce_dict(values: dict[str, float], keys: Sequence[str] | None = None) -> dict[str, float]:
    """Sum every value over ranks in one collective; ``keys`` fixes the order (and fills a key a rank
    lacks with 0), else the sorted keys, which must then be the same on every rank."""
    if not active():
        return dict(values)
    names = list(keys) if keys is not None else sorted(values)
    t = torch.tensor([float(values.get(k, 0.0)) for k in names], dtype=torch.float64, device=_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(names, t.tolist()))


def union_keys(values: dict[str, Any]) -> list[str]:
    """The sorted union of every rank's keys (a rank with no rows this time may lack some)."""
    if not active():
        return sorted(values)
    return sorted({k for keys in gather_objects(sorted(values)) for k in keys})


def agree(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any rank (all-reduce MAX of the flag)."""
    if not active():
        return flag
    return all_reduce_max(1.0 if flag else 0.0) > 0


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (pickled by torch: only rlx's own values go through it)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=_device())
    return box[0]


def gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


@torch.no_grad()
def broadcast_module(module: torch.nn.Module | None, src: int = 0) -> None:
    """Rank ``src``'s parameters and buffers on every rank (as DDP does when it wraps a model): a model
    built from a config is initialised from each rank's own seed."""
    if module is None or not active():
        return
    for t in [*module.parameters(), *module.buffers()]:
        dist.broadcast(t.data, src=src)


@torch.no_grad()
def all_reduce_gradients(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum ``.grad`` over ranks, in buckets of one dtype. A parameter whose gradient is None on this
    rank (no rows here this time) takes part with zeros, so every rank calls the same collectives."""
    if not active():
        return
    params = [p for p in params if p.requires_grad]
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for p in params:
        assert p.grad is not None
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p.grad)
    for grads in by_dtype.values():
        bucket: list[Tensor] = []
        size = 0
        for g in grads:
            bucket.append(g)
            size += g.numel()
            if size >= BUCKET_ELEMENTS:
                _reduce_bucket(bucket)
                bucket, size = [], 0
        if bucket:
            _reduce_bucket(bucket)


def _reduce_bucket(grads: list[Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def all_reduce_tensor(t: Tensor) -> Tensor:
    """The sum of ``t`` over ranks (a new tensor; ``t`` itself in a single process)."""
    if not active():
        return t
    out = t.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


class Rows:
    """Where this rank's rows sit in the gathered global batch: ``[offset, offset + n)``, ``T`` columns."""

    def __init__(self, offset: int, n: int, width: int) -> None:
        self.offset, self.n, self.width = offset, n, width

    def take(self, t: Tensor) -> Tensor:
        """This rank's rows of a global ``[N, T_max, ...]`` tensor, cut back to its own width."""
        rows = t[self.offset : self.offset + self.n]
        return rows[:, : self.width] if rows.dim() >= 2 else rows


def gather_rows(t: Tensor, pad: float = 0.0) -> tuple[Tensor, Rows]:
    """The ranks' ``[n_r, T_r, ...]`` tensors stacked in rank order into ``[sum n_r, max T_r, ...]``
    (padded with ``pad``), and this rank's place in it. In a single process: ``t`` itself."""
    n = t.shape[0]
    width = t.shape[1] if t.dim() >= 2 else 0
    if not active():
        return t, Rows(0, n, width)
    if t.dtype == torch.bool:  # gloo has no bool all_gather
        full, rows = gather_rows(t.to(torch.uint8), pad)
        return full.bool(), rows
    rank, size = dist.get_rank(), dist.get_world_size()
    shape = torch.tensor([n, width], dtype=torch.int64, device=t.device)
    shapes = [torch.zeros_like(shape) for _ in range(size)]
    dist.all_gather(shapes, shape)
    ns = [int(s[0]) for s in shapes]
    max_n, max_w = max(ns), max(int(s[1]) for s in shapes)
    shape_out = (max_n, *((max_w,) if t.dim() >= 2 else ()), *t.shape[2:])
    padded = torch.full(shape_out, pad, dtype=t.dtype, device=t.device)
    if t.dim() >= 2:
        padded[:n, :width] = t
    else:
        padded[:n] = t
    parts = [torch.empty_like(padded) for _ in range(size)]
    dist.all_gather(parts, padded.contiguous())
    full = torch.cat([part[:k] for part, k in zip(parts, ns)], dim=0)
    return full, Rows(sum(ns[:rank]), n, width)
