"""The reward-curve PNG logged with every run."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure  # the object API: no pyplot state, no GUI backend

logging.getLogger("matplotlib").setLevel(logging.WARNING)


def reward_curve(history: Sequence[dict[str, float]], path: Path, title: str) -> Path:
    """Training reward per iteration and held-out metrics at their evaluation steps."""
    fig = Figure(figsize=(10, 3.5))
    ax = fig.subplots(1, 2)
    train = [(r["step"], r["reward/mean"]) for r in history if "reward/mean" in r]
    if train:
        ax[0].plot(*zip(*train), lw=1)
    ax[0].set(xlabel="iteration", ylabel="reward/mean", title="training reward")
    for key in ("eval/exact", "eval/reward_norm"):
        pts = [(r["step"], r[key]) for r in history if key in r]
        if pts:
            ax[1].plot(*zip(*pts), marker="o", label=key)
    ax[1].set(xlabel="iteration", title="held-out", ylim=(-0.02, 1.02))
    if ax[1].get_legend_handles_labels()[0]:
        ax[1].legend(loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path
