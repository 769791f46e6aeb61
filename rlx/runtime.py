"""Where and how a process runs: its device, its seeds, its place among data-parallel ranks.

Shared by the loops, the rewards that load a model, and the commands, so none of them needs to import
the training entry point for it.
"""

from __future__ import annotations

import os
import random
import sys

import numpy as np
import torch

from rlx.errors import RlxError


def resolve_device(name: str) -> torch.device:
    """``trainer.device``: auto (CUDA when torch sees a GPU), cpu, cuda or cuda:N, checked."""
    name = str(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
            raise RlxError(
                f"trainer.device={name} but no CUDA device is available (torch {torch.__version__}, "
                f"{build}); use trainer.device=cpu or auto"
            )
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise RlxError(f"trainer.device={name} but only {torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise RlxError(f"trainer.device={name!r} is not one of auto, cpu, cuda, cuda:N")


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's global RNGs."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def dist_rank() -> tuple[int, int]:
    """(rank, world size) from the torchrun environment; (0, 1) for a plain process."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (``getrusage``: what ``/usr/bin/time`` and the
    bench report); 0 where the platform has no ``resource`` module (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # bytes on macOS, KiB on Linux


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The memory figures logged with every step, in GiB:

    - ``memory/peak_rss_gb``: the process's peak resident set so far (`peak_rss_bytes`); it only grows.
    - on CUDA, ``memory/cuda_max_allocated_gb`` and ``memory/cuda_max_reserved_gb``: the peak of torch's
      allocator (tensors; tensors and its cached blocks) on ``device`` since the previous call, which
      resets them: each step's own peak, where ``system/gpu_*`` (MLflow's monitor) sees the whole device
      every few seconds. Rank 0's figures under torchrun, like every logged metric.
    """
    gib = 2.0**30
    out = {"memory/peak_rss_gb": peak_rss_bytes() / gib}
    if device.type == "cuda":
        out["memory/cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / gib
        out["memory/cuda_max_reserved_gb"] = torch.cuda.max_memory_reserved(device) / gib
        torch.cuda.reset_peak_memory_stats(device)
    return out
