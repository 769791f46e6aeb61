"""A CPU stand-in for an external rollout engine (such as vLLM), registered as ``rollout.engine=standin``
(and the hf engine with its calls recorded, ``hf_recording``) when this module is imported: for
tests/test_rollout_engines.py and its torchrun worker, never for users."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from rlx.models import Policy, Sampling
from rlx.rollout.engines import ENGINES, HfEngine, RolloutEngine, checksum


class StandInEngine(RolloutEngine):
    """A CPU stand-in for an external engine such as vLLM: it samples with its own deep copy of the
    policy's model (weights only change when pushed), returns no log-probs (as vLLM here), and records
    every push (the step, the parameter names, a checksum of the tensors) and every sampling call."""

    name = "standin"

    def __init__(self, policy: Policy) -> None:
        self.copy = copy.copy(policy)
        self.copy.model = copy.deepcopy(policy.model).requires_grad_(False)
        self.pushes: list[dict] = []
        self.calls: list[Sampling] = []
        self.rows: list[int] = []

    def generate(
        self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        self.calls.append(sampling)
        self.rows.append(len(prompt_ids))
        tokens, mask, _ = self.copy.generate(prompt_ids, prompt_mask, sampling)
        return tokens, mask, None

    def load_weights(self, weights: Iterable[tuple[str, Tensor]], *, step: int) -> None:
        named = list(weights)
        own = dict(self.copy.model.named_parameters())
        with torch.no_grad():
            for name, tensor in named:
                own[name].copy_(tensor)
        self.pushes.append({"step": step, "names": [n for n, _ in named], "checksum": checksum(named)})


class RecordingHfEngine(HfEngine):
    """The hf engine, unchanged, recording the sampling settings it is called with."""

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.calls: list[Sampling] = []

    def generate(self, prompt_ids: Tensor, prompt_mask: Tensor, sampling: Sampling):
        self.calls.append(sampling)
        return super().generate(prompt_ids, prompt_mask, sampling)


BUILT: list[RolloutEngine] = []  # every engine the builders below made, newest last

if "standin" not in ENGINES.names():

    @ENGINES.register("standin")
    def _standin(policy: Policy, plan: Any) -> RolloutEngine:
        BUILT.append(StandInEngine(policy))
        return BUILT[-1]

    @ENGINES.register("hf_recording")
    def _hf_recording(policy: Policy, plan: Any) -> RolloutEngine:
        BUILT.append(RecordingHfEngine(policy))
        return BUILT[-1]
