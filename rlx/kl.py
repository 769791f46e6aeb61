"""Per-token estimators of KL(pi_theta || pi_ref) from tokens sampled by pi_theta (Schulman 2020,
"Approximating KL divergence").

Interface: ``estimator(logp, ref_logp) -> per_token_kl``, same shape, no reduction. With
``d = logp - ref_logp`` and ``rho = pi_ref / pi_theta = exp(-d)``:

- ``k1``: d. Unbiased, high variance, negative on some tokens.
- ``k2`` (``mse``): d^2 / 2. Biased, low variance, >= 0.
- ``k3`` (``low_var_kl``): rho - 1 - log rho = exp(-d) - 1 + d. Unbiased, >= 0, low variance.
- ``abs``: |d|.

Each is registered ``token_local=True`` (a function of the token's own log-probs), which lets the KL in
the loss take the fused head (`rlx.models.logprobs.FusedLoss`).

Erratum in the source notes: seed 003's ``compute_rewards_with_kl_penalty`` computes "k3" as
``(r - 1) - log r`` with ``r = pi / pi_ref``; that estimates KL(pi_ref || pi) and is biased for the
direction we penalise. Seeds 002 and 004 have it right, as here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlx.registry import Registry

KL_ESTIMATORS = Registry("KL estimator", ["rlx.kl"])


@KL_ESTIMATORS.register("k1", token_local=True)
def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log pi_theta - log pi_ref."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2", aliases=["mse"], token_local=True)
def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = (log pi_theta - log pi_ref)^2 / 2."""
    return 0.5 * (logp - ref_logp).square()


@KL_ESTIMATORS.register("k3", aliases=["low_var_kl"], token_local=True)
def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = exp(-d) - 1 + d with d = log pi_theta - log pi_ref (``rho - 1 - log rho``)."""
    d = logp - ref_logp
    return torch.expm1(-d) + d


@KL_ESTIMATORS.register("abs", token_local=True)
def kl_abs(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """|log pi_theta - log pi_ref|."""
    return (logp - ref_logp).abs()


class KLController:
    """The KL-in-reward coefficient beta, fixed or adaptive (Ziegler et al. 2019, section 2.2).

    Adaptive: after each batch, e = clip(KL / target - 1, -0.2, 0.2) and
    beta <- beta * (1 + e * n / horizon), with KL the batch's mean per-sequence KL to the reference
    (the per-token estimates summed over each completion, as the paper and TRL measure it) and n the
    number of completions in the batch. ``target = None`` keeps beta fixed.
    """

    def __init__(self, coef: float, *, target: float | None = None, horizon: float = 10000.0) -> None:
        if coef < 0:
            raise ValueError(f"KL coefficient must be >= 0, got {coef}")
        if target is not None and target <= 0:
            raise ValueError(f"KL target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"KL horizon must be > 0, got {horizon}")
        self.coef = float(coef)
        self.target = None if target is None else float(target)
        self.horizon = float(horizon)

    @property
    def adaptive(self) -> bool:
        return self.target is not None

    def update(self, kl: float, n: int) -> float:
        """Move beta after a batch of ``n`` completions whose mean sequence KL was ``kl``; return it."""
        if self.target is not None:
            error = min(max(kl / self.target - 1.0, -0.2), 0.2)
            self.coef *= 1.0 + error * n / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])
        self.target = None if state["target"] is None else float(state["target"])
        self.horizon = float(state["horizon"])
