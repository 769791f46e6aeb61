"""Where and how a process runs: its device, its seeds, its place among data-parallel ranks.

Shared by the loops, the rewards that load a model, and the commands, so none of them needs to import
the training entry point for it.
"""

from __future__ import annotations

import os
import random

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
