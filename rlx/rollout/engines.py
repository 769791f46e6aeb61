"""Rollout engines: what draws the completions of the online loop (``rollout.engine``).

An engine samples completion ids for left-padded prompt ids and receives the policy's weights after
each iteration's update, before anything samples again:

- ``hf`` (the default): `Policy.generate`, the policy itself, which records the old log-probs as it
  draws each token. Nothing to push: the engine is the policy.
- ``vllm`` (`rlx.rollout.vllm_engine`, ``pip install 'rlx[vllm]'``, a CUDA GPU): vLLM colocated in
  each training process, TRL's ``vllm_mode="colocate"`` layout; untested here (no GPU, vLLM not
  installed).

An engine that does not record log-probs (every one but ``hf``) returns None for them, and
`rlx.rollout.sample_groups` has the policy score the sampled tokens (`recompute_old_logp`), in the
update's micro-batches and through the same fused scoring path as the update, so the first epoch's
ratio pi/pi_old is exactly 1 (an engine's own log-probs are of its own kernels and precision).

A new engine is a class with `generate` / `load_weights` and a builder registered with
``@ENGINES.register(name)`` in any module of ``rlx.rollout``; `check_engine` refuses an unknown name.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlx.errors import RlxError, require
from rlx.registry import Registry

if TYPE_CHECKING:
    from rlx.models import Policy, Sampling

ENGINES = Registry("rollout engine", ["rlx.rollout"])


class RolloutEngine:
    """Draws completions; holds (a copy of) the policy's weights, refreshed by `sync`.

    ``weights_step``: the number of finished iterations whose weights the engine holds (None before
    the first push), so the loop pushes exactly when the engine is behind (at start, after a resume,
    after each update)."""

    name = "base"
    weights_step: int | None = None

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """One completion per row of ``prompt_ids`` ``[N, P]`` (left-padded, ``prompt_mask``): token ids
        ``[N, T]`` (T = the answer length, rows padded with the pad token after their EOS), the mask
        ``[N, T]`` (1.0 through the first EOS), and ``log pi_old(y_t)`` ``[N, T]`` when the engine records
        them as the policy's own (else None: the policy recomputes them)."""
        raise NotImplementedError

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], *, step: int) -> None:
        """Take the named tensors (the policy's ``named_parameters`` names) as the weights of ``step``."""
        raise NotImplementedError

    def sync(self, policy: Policy, step: int) -> None:
        """Push the policy's current weights (those after ``step`` iterations)."""
        self.load_weights(policy_weights(policy), step=step)
        self.weights_step = step


def policy_weights(policy: Policy) -> Iterator[tuple[str, Tensor]]:
    """The policy model's parameters by name, detached; a sharded parameter (FSDP2's DTensor) is
    gathered whole first (every rank calls this in the same order, so the gathers match)."""
    for name, p in policy.model.named_parameters():
        t = p.detach()
        full = getattr(t, "full_tensor", None)
        yield name, (full() if callable(full) else t)


def checksum(tensors: Iterable[tuple[str, Tensor]]) -> str:
    """A sha256 of the names, dtypes, shapes and bytes of named tensors (what a push carried)."""
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def recompute_old_logp(
    policy: Policy,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    tokens: Tensor,
    mask: Tensor,
    temperature: float,
    micro_batch_size: int | None,
) -> Tensor:
    """``log pi_old(y_t)`` ``[N, T]`` of sampled tokens under the policy as it is now (it sampled them,
    through an engine), float32, 0 on padding: `Policy.score` (the fused head where the model allows
    it) over the same micro-batches of rows ``0..N-1`` that the update's first minibatch walks, so
    the first epoch's ratio is exactly 1 (with ``algo.minibatches=1``; rounding-level otherwise)."""
    n = len(tokens)
    size = micro_batch_size or n
    out = torch.zeros(tokens.shape, dtype=torch.float32, device=tokens.device)
    was_training = policy.model.training
    policy.model.eval()  # as the loop keeps it (no dropout), so sampled and scored log-probs agree
    try:
        with torch.no_grad():
            for start in range(0, n, max(size, 1)):
                rows = slice(start, start + size)
                scores = policy.score(
                    prompt_ids[rows], prompt_mask[rows], tokens[rows], mask[rows], temperature
                )
                out[rows] = scores.logp.float() * mask[rows]
    finally:
        policy.model.train(was_training)
    return out


class HfEngine(RolloutEngine):
    """``rollout.engine=hf``: the policy samples itself (`Policy.generate`), recording log-probs."""

    name = "hf"

    def __init__(self, policy: Policy) -> None:
        self.policy = policy

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        return self.policy.generate(prompt_ids, prompt_mask, sampling)

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], *, step: int) -> None:
        """Nothing to copy: this engine samples with the policy's own parameters."""

    def sync(self, policy: Policy, step: int) -> None:
        self.weights_step = step


@ENGINES.register("hf")
def hf_engine(policy: Policy, plan: Any) -> RolloutEngine:
    """The policy's own sampling loop (the default)."""
    return HfEngine(policy)


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_engine(name: str, device: torch.device | None = None) -> None:
    """Refuse, in one line and before any model is built: an unknown engine; with the training
    ``device`` (the online loop's plan), ``vllm`` without vLLM installed (checked first), or without
    a CUDA GPU to run it on."""
    known = ENGINES.names()
    require(name in known, f"rollout.engine={name!r} is not a rollout engine; known: {', '.join(known)}")
    if name != "vllm" or device is None:
        return
    require(
        vllm_installed(),
        "rollout.engine=vllm needs vLLM, which is not installed: pip install 'rlx[vllm]' "
        "(a CUDA build; vLLM pins its own torch), or use rollout.engine=hf",
    )
    if device.type != "cuda" or not torch.cuda.is_available():
        raise RlxError(
            f"rollout.engine=vllm needs a CUDA GPU (vLLM runs colocated on the training GPU); the training "
            f"device is {device}{'' if torch.cuda.is_available() else ' and torch sees no CUDA device'}: "
            "use rollout.engine=hf"
        )


def build_engine(policy: Policy, plan: Any) -> RolloutEngine:
    """The engine ``rollout.engine`` names, for ``policy``. ``plan`` is the checked `rlx.loops.Plan`
    (typed ``Any`` here: rlx.loops imports this module to check the engine's name)."""
    entry = ENGINES.get(plan.rollout.engine)
    engine: Any = entry.fn(policy, plan)
    return engine
