"""Data parallelism under torchrun, from torch.distributed itself (``trainer.parallel``).

``trainer.parallel``: ``auto`` (``ddp`` under torchrun, ``none`` in a plain process), ``none``, ``ddp``
or ``fsdp2`` (the policy sharded by torch's FSDP2: see the fsdp2 section below; everything here holds
for it too, except that its sharded weights' gradients are reduced by FSDP2). Under ``ddp`` every
rank holds a full copy of the model, samples (or reads) its share of one global batch, and the ranks
agree on everything that decides the update:

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

import math
import os
import sys
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
    """``trainer.parallel`` checked and resolved: ``none``, ``ddp`` or ``fsdp2``."""
    setting = str(setting)
    if setting not in PARALLEL_MODES:
        raise RlxError(f"trainer.parallel={setting!r} is not one of {', '.join(PARALLEL_MODES)}")
    if setting == "auto":
        return "ddp" if under_torchrun() else "none"
    if setting in ("ddp", "fsdp2") and not under_torchrun():
        missing = [k for k in TORCHRUN_VARS if not os.environ.get(k)]
        raise RlxError(
            f"trainer.parallel={setting} needs torchrun's environment ({', '.join(missing)} not set); start "
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


# torch registers sharding rules for the fused Adam and AdamW steps only (the ``_fused_adam(w)_`` ops in
# torch/distributed/tensor/_ops/_pointwise_ops.py, torch 2.13): another optimizer's fused step (SGD,
# Adagrad) raises NotImplementedError on fsdp2's DTensor parameters at the first update
FUSED_ON_SHARDS = ("torch.optim.Adam", "torch.optim.AdamW")


def check_fused_on_shards(optimizer: dict[str, Any]) -> None:
    """Refuse, before any work, an ``optimizer.fused=true`` that fsdp2's sharded parameters cannot take."""
    target = str(optimizer.get("_target_", ""))
    if optimizer.get("fused") and target not in FUSED_ON_SHARDS:
        raise RlxError(
            f"optimizer.fused=true with trainer.parallel=fsdp2: torch has no fused {target} step for "
            "sharded (DTensor) parameters, only for Adam and AdamW; set optimizer.fused=false"
        )


def setup(parallel: str, device: torch.device) -> torch.device:
    """Join the process group (``ddp``, ``fsdp2``): gloo on CPU, nccl on CUDA with this rank on
    ``cuda:LOCAL_RANK``. Returns the device this rank computes on. Idempotent."""
    mode = resolve_parallel(parallel)
    if mode == "none":
        return device
    _, world_size, local_rank = env_world()
    if device.type == "cuda":
        if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
            raise RlxError(
                f"trainer.parallel={mode} on CUDA (nccl) needs a GPU for local rank {local_rank}; torch sees "
                f"{torch.cuda.device_count() if torch.cuda.is_available() else 0}: use trainer.device=cpu "
                "(gloo) or fewer processes per node"
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise RlxError(f"trainer.parallel={mode} supports cpu (gloo) and cuda (nccl), not {device.type}")
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


# A signal that reached this rank after the last training step (rlx.train.StopSignals): under torchrun
# it is not raised where it lands, which could be between two collectives the other ranks will still
# enter, but kept here until the ranks next agree (`signal_everywhere`).
PENDING_SIGNAL: list[int] = []


def signal_everywhere() -> int | None:
    """The signal any rank has pending (all-reduce MAX of the signal numbers; one process: its own), or
    None. Every rank calls it at the same point."""
    mine = float(PENDING_SIGNAL[-1]) if PENDING_SIGNAL else 0.0
    signum = int(all_reduce_max(mine)) if active() else int(mine)
    return signum or None


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
    # fsdp2's sharded parameters (DTensors) had their gradients reduce-scattered (summed) in backward
    params = [p for p in params if p.requires_grad and not is_sharded(p)]
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


# -- fsdp2 ------------------------------------------------------------------------------------------
# trainer.parallel=fsdp2: torch's own FSDP2 (`torch.distributed.fsdp.fully_shard`). Each transformer
# block (the model's ``_no_split_modules`` classes) and then the root are sharded over the ranks: every
# rank keeps 1/N of each parameter, of its gradient and of the optimizer's moments; a block's forward
# all-gathers its parameters and its backward reduce-scatters its gradients. What differs from ddp:
# - the gradients are reduced in backward by FSDP2 itself, as a *sum* (rlx's losses are already divided
#   by the global counts; FSDP2's default is a mean over ranks), so `all_reduce_gradients` skips them;
# - every forward and backward of the policy is a collective, so every rank must run as many of them
#   as the others: sampling and held-out generation (whose lengths differ between ranks: generation
#   stops when a rank's rows have all ended) run with the parameters unsharded once
#   (`FullParameters`), as do DAPO's extra sampling rounds and a value head's V_old pass; where a rank
#   has fewer micro-batches than another in an update (DAPO's kept groups, an offline epoch's last
#   smaller batch), the ranks agree on the most (`passes_everywhere`) and the rank with fewer runs
#   zero-weight passes (its loss times 0: the same parameters get gradients, all exact zeros) (h11g);
#   TRPO, which differentiates with torch.autograd.grad (which FSDP2 does not hook) and writes flat
#   parameter vectors, works on the whole parameters gathered once, written back to the shards after
#   (`WholeParameters`: no memory saved during its update) (h11g);
# - checkpoints hold the full (unsharded) model and optimizer state, gathered by every rank through
#   `torch.distributed.checkpoint.state_dict` and written by rank 0, so a checkpoint reads the same
#   as a ddp or single-process one;
# - the frozen reference model (a KL term, DPO) and a separate critic (algo.critic=separate) are full,
#   unsharded copies on every rank (made before the policy is sharded): their forwards then need no
#   collective and their checkpointed states are plain state dicts (the critic's gradients are
#   all-reduced as under ddp), at the cost of one full copy of the weights per rank each; so is a value
#   head on the policy's trunk (algo.critic=head: tiny, its gradient all-reduced) (h11g).


def is_sharded(t: Any) -> bool:
    """True for a DTensor (an fsdp2-sharded parameter or gradient). Without torch.distributed.tensor
    imported (no fsdp2 in this process) nothing is, and the import is not paid for."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


def sharded_root(model: Any) -> bool:
    """Whether fsdp2 shards ``model`` itself (`shard_model` always shards the root): then every forward
    of it gathers the weights, a collective every rank must run as often. Free without fsdp2 imported."""
    fsdp = sys.modules.get("torch.distributed.fsdp")
    return fsdp is not None and isinstance(model, fsdp.FSDPModule)


def fsdp_modules(model: torch.nn.Module | None) -> list[torch.nn.Module]:
    """The modules of ``model`` that fsdp2 shards (the root last), or [] for an unsharded model."""
    if model is None or "torch.distributed.fsdp" not in sys.modules:
        return []
    from torch.distributed.fsdp import FSDPModule

    found = [m for m in model.modules() if isinstance(m, FSDPModule)]
    return [*[m for m in found if m is not model], *([model] if model in found else [])]


def shard_model(model: torch.nn.Module, device: torch.device) -> None:
    """``fully_shard`` every transformer block of ``model`` (its ``_no_split_modules`` classes), then
    the root (embeddings, final norm, LM head: one group, so tied input and output embeddings stay
    one parameter), over every rank; gradients summed, not averaged."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    names = set(getattr(model, "_no_split_modules", None) or ())
    for module in [m for m in model.modules() if type(m).__name__ in names and m is not model]:
        fully_shard(module, mesh=mesh)
    fully_shard(model, mesh=mesh)
    for module in fsdp_modules(model):
        # rlx divides every loss by the global token / sequence counts, so the ranks' gradients add up;
        # a sum also works on gloo (FSDP2's averaging reduce-scatter needs PREMUL_SUM, which gloo lacks)
        module.set_gradient_divide_factor(1.0)  # type: ignore[operator]
        module.set_force_sum_reduction_for_comms(True)  # type: ignore[operator]


def passes_everywhere(count: int, model: torch.nn.Module | None) -> int:
    """fsdp2: the most forward/backward passes any rank has to run this time (one all-reduce MAX), so
    that a rank with fewer (fewer rows: DAPO's kept groups, an epoch's last smaller batch) runs
    zero-weight passes up to it: every forward and backward of a sharded model is a collective. For an
    unsharded model ``count`` itself, with no collective (ddp reduces the gradients once, after)."""
    if not fsdp_modules(model):
        return count
    return int(all_reduce_max(float(count)))


_UNSHARDED_DEPTH: dict[int, int] = {}  # id(root module) -> how many `FullParameters` blocks are open


class FullParameters:
    """fsdp2: every sharded module of ``model`` unsharded (one all-gather each, on every rank) for the
    block, and no reshard after each forward inside it, so that the forwards inside run no collective
    and the ranks may run different numbers of them (sampling, held-out generation). Resharded after,
    with the blocks resharding after forward again and the root not (FSDP2's defaults). Re-entrant,
    also across instances for one model (the depth is kept per model); a no-op for an unsharded model."""

    def __init__(self, model: torch.nn.Module | None) -> None:
        self.modules = fsdp_modules(model)
        self.key = id(self.modules[-1]) if self.modules else 0

    def __enter__(self) -> None:
        if not self.modules:
            return
        _UNSHARDED_DEPTH[self.key] = _UNSHARDED_DEPTH.get(self.key, 0) + 1
        if _UNSHARDED_DEPTH[self.key] > 1:
            return
        for module in self.modules:
            module.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            module.unshard()  # type: ignore[operator]

    def __exit__(self, *exc: object) -> None:
        if not self.modules:
            return
        _UNSHARDED_DEPTH[self.key] -= 1
        if _UNSHARDED_DEPTH[self.key] > 0:
            return
        del _UNSHARDED_DEPTH[self.key]
        root = self.modules[-1]
        for module in self.modules:
            module.reshard()  # type: ignore[operator]
            module.set_reshard_after_forward(module is not root, recurse=False)  # type: ignore[operator]


class WholeParameters:
    """fsdp2 (h11g): a block that reads and writes whole parameters and differentiates with
    ``torch.autograd.grad`` (TRPO: its gradient, Fisher-vector products by double backprop, a line search
    over flat parameter vectors). Inside, every sharded module is unsharded once (`FullParameters`) and
    neither reshards after backward nor reduce-scatters gradients (there are none in ``.grad``: the
    block sums its own gradients over ranks, as under ddp), so ``model.parameters()`` are the whole
    tensors; the block writes them in place. On exit each rank copies its shard of the new whole values
    (torch.chunk along dim 0: FSDP2's Shard(0) layout) into its sharded parameters. A no-op unsharded."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model, self.modules = model, fsdp_modules(model)
        self.full = FullParameters(model)
        self.sharded: dict[str, Any] = {}

    def __enter__(self) -> None:
        if not self.modules:
            return
        self.sharded = dict(self.model.named_parameters())
        for module in self.modules:
            module.set_reshard_after_backward(False, recurse=False)  # type: ignore[operator]
            module.set_requires_gradient_sync(False, recurse=False)  # type: ignore[operator]
        self.full.__enter__()

    def __exit__(self, *exc: object) -> None:
        if not self.modules:
            return
        whole = {name: p.detach().clone() for name, p in self.model.named_parameters()}
        self.full.__exit__()
        for module in self.modules:
            module.set_reshard_after_backward(True, recurse=False)  # type: ignore[operator]
            module.set_requires_gradient_sync(True, recurse=False)  # type: ignore[operator]
        rank, size = dist.get_rank(), dist.get_world_size()
        with torch.no_grad():
            for name, param in self.sharded.items():
                local = param.to_local() if is_sharded(param) else param
                part = whole[name].chunk(size, dim=0)[rank] if is_sharded(param) else whole[name]
                local.copy_(part.reshape(local.shape))


def shard_policy(policy: Any, device: torch.device, optimizers: Sequence[torch.optim.Optimizer]) -> None:
    """Shard ``policy.model`` in place (`shard_model`) after the loop has built it, its reference copy
    and its optimizers; each optimizer's parameters become the sharded ones (nothing has been stepped,
    so no state moves); ``policy.generate`` runs with the parameters unsharded (`FullParameters`)."""
    model = policy.model
    before = {id(p): name for name, p in model.named_parameters()}
    shard_model(model, device)
    after = dict(model.named_parameters())
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            group["params"] = [after[before[id(p)]] if id(p) in before else p for p in group["params"]]
        optimizer.state.clear()  # empty before the first step; keyed by the old parameters otherwise
    hook = getattr(policy, "after_sharding", None)
    if hook is not None:  # h11g: a reward model (algo=rm) registers its scoring method with FSDP2
        hook()
    generate = getattr(policy, "generate", None)
    if generate is None:  # a reward model samples nothing
        return
    gathered = FullParameters(model)

    def generate_unsharded(*args: Any, **kwargs: Any) -> Any:
        with gathered:
            return generate(*args, **kwargs)

    policy.generate = generate_unsharded  # this instance only: rollouts and evaluation both go through it


def full_state_dicts(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer | None
) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """fsdp2: the full model and optimizer state dicts, gathered by every rank (collectives), on rank 0's
    CPU (the other ranks get empty dicts): what a checkpoint holds, as an unsharded run writes it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    # a parameter reached by two names (tied input and output embeddings) comes back as two copies: one
    # tensor under both names again, so that save_pretrained stores it once, as it does unsharded
    first: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first and name in weights and first[id(param)] in weights:
            weights[name] = weights[first[id(param)]]
        first.setdefault(id(param), name)
    optim = None
    if optimizer is not None:
        optim = get_optimizer_state_dict(_optimizer_owner(model, optimizer), optimizer, options=options)
    return weights, optim


def _optimizer_owner(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> torch.nn.Module:
    """The module whose parameter names key ``optimizer``'s full state dict: ``model`` itself, or (h11g:
    a value head on the policy's trunk, algo.critic=head, optimized with it but not part of it) a module
    holding ``model`` and the optimizer's other parameters in their optimizer order, the same at save
    and at load. torch's state-dict functions name every optimized parameter by its place in a module."""
    own = {id(p) for p in model.parameters()}
    extra = [p for group in optimizer.param_groups for p in group["params"] if id(p) not in own]
    if not extra:
        return model
    others = torch.nn.Module()
    for i, p in enumerate(extra):
        others.register_parameter(f"p{i}", p)
    return torch.nn.ModuleDict({"model": model, "others": others})


def whole_state_dict(model: torch.nn.Module) -> dict[str, Tensor]:
    """``model.state_dict()`` with fsdp2's shards gathered into whole tensors on every rank (one
    all-gather per sharded tensor, in the same order on every rank): what a frozen, unsharded copy of
    the model (the reference, refreshed every kl.ref_refresh iterations) loads. Plain otherwise."""
    state = model.state_dict()
    if not fsdp_modules(model):
        return state
    return {k: v.full_tensor() if is_sharded(v) else v for k, v in state.items()}


def load_full_state_dicts(
    model: torch.nn.Module,
    weights: dict[str, Tensor] | None,
    optimizer: torch.optim.Optimizer | None = None,
    optim_state: dict[str, Any] | None = None,
) -> None:
    """fsdp2: load full (unsharded) state dicts, read by every rank, into the sharded model / optimizer."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if weights is not None:
        set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    if optimizer is not None and optim_state is not None:
        set_optimizer_state_dict(
            _optimizer_owner(model, optimizer),
            optimizer,
            optim_state,
            options=StateDictOptions(full_state_dict=True),
        )


@torch.no_grad()
def clip_sharded_gradients(params: Sequence[torch.nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over parameters of which some are fsdp2-sharded (DTensor gradients: their norm
    is reduced over ranks by DTensor) and some are not (a value head, already all-reduced): the global
    norm of all of them, then the same scaling, max_norm / (norm + 1e-6) capped at 1, as torch's."""
    from torch.nn.utils import get_total_norm

    sharded = [p.grad for p in params if p.grad is not None and is_sharded(p.grad)]
    plain = [p.grad for p in params if p.grad is not None and not is_sharded(p.grad)]
    parts = []
    if sharded:
        norm = get_total_norm(sharded)
        parts.append(norm.full_tensor() if is_sharded(norm) else norm)
    if plain:
        parts.append(get_total_norm(plain))
    if not parts:
        return 0.0
    total = float(torch.linalg.vector_norm(torch.stack([x.float().cpu() for x in parts])))
    coef = min(max_norm / (total + 1e-6), 1.0)
    for g in [*sharded, *plain]:
        g.mul_(coef)
    return total


class FullWeights:
    """fsdp2, on rank 0: ``policy`` as a checkpoint writes it, with its gathered full weights (every other
    attribute is the policy's own). ``save`` is the policy's ``save_pretrained`` given those weights."""

    def __init__(self, policy: Any, weights: dict[str, Tensor]) -> None:
        self.policy, self.weights = policy, weights

    def save(self, path: Any) -> None:
        model = self.policy.model
        if hasattr(model, "merge_and_unload"):  # h11g: LoRA (peft): merged plain weights, as unsharded
            merged_lora(model, self.weights).save_pretrained(str(path), safe_serialization=True)
        else:
            model.save_pretrained(str(path), state_dict=self.weights, safe_serialization=True)
        self.policy.tokenizer.save_pretrained(str(path))
        critic = getattr(self.policy, "critic", None)  # h11g: a PPO policy's critic (`ActorCriticPolicy`)
        if critic is not None:  # unsharded: its value head (and a separate critic's model) as it is
            critic.save(path)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.policy, name)


def merged_lora(model: Any, weights: dict[str, Tensor]) -> torch.nn.Module:
    """fsdp2 with LoRA (h11g), on rank 0: what `rlx.models.hf.HFPolicy.save` writes (the adapters merged
    into plain weights) from the gathered full state dict of the sharded peft ``model``. The sharded
    model cannot be copied and merged as a whole, so a fresh unsharded copy of the same architecture and
    adapters is built on the CPU, given ``weights``, and merged (peft's ``merge_and_unload``)."""
    import copy

    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = model.get_base_model()
    fresh = AutoModelForCausalLM.from_config(copy.deepcopy(base.config), torch_dtype=base.dtype)
    fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config[model.active_adapter]))
    fresh.load_state_dict(weights)
    return fresh.merge_and_unload()


def finite_everywhere(loss: Tensor, model: torch.nn.Module | None) -> bool:
    """fsdp2: whether ``loss`` is finite on every rank, agreed before any rank goes into its backward
    (whose reduce-scatter is a collective: a rank that skipped it for a non-finite loss would leave the
    others waiting there). The caller stops its micro-batches when not. True without a collective
    for an unsharded model (ddp agrees once after the micro-batches, `NonFiniteGuard.agreed_ok`)."""
    if not fsdp_modules(model):
        return True
    return not agree(not math.isfinite(loss.item()))
