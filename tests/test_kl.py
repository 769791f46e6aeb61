"""KL estimators: hand values, signs, and unbiasedness on a distribution where KL is known."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.kl import KL_ESTIMATORS


def test_hand_values():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    d = [math.log(2.0), math.log(0.5)]
    get = lambda name: KL_ESTIMATORS.get(name).fn(logp, ref).tolist()  # noqa: E731
    assert get("k1") == pytest.approx(d)
    assert get("k2") == pytest.approx([x * x / 2 for x in d])
    # k3 = rho - 1 - log rho with rho = pi_ref / pi_theta: 0.5 - 1 + ln 2 and 2 - 1 - ln 2
    assert get("k3") == pytest.approx([0.5 - 1 + math.log(2), 2 - 1 - math.log(2)])
    assert get("abs") == pytest.approx([abs(x) for x in d])


def test_aliases():
    assert KL_ESTIMATORS.get("low_var_kl").name == "k3"
    assert KL_ESTIMATORS.get("mse").name == "k2"


def test_k3_is_nonnegative_and_zero_at_equality():
    logp = torch.randn(1000)
    ref = torch.randn(1000)
    assert (KL_ESTIMATORS.get("k3").fn(logp, ref) >= 0).all()
    assert KL_ESTIMATORS.get("k3").fn(logp, logp).abs().max() == 0


def test_k1_and_k3_are_unbiased_for_kl_theta_ref_and_seed_003s_form_is_not():
    torch.manual_seed(0)
    p = torch.tensor([0.7, 0.2, 0.1])  # pi_theta (the sampler)
    q = torch.tensor([0.2, 0.3, 0.5])  # pi_ref
    true_kl = float((p * (p / q).log()).sum())
    y = torch.multinomial(p, 400_000, replacement=True)
    logp, ref = p.log()[y], q.log()[y]
    for name in ("k1", "k3"):
        est = KL_ESTIMATORS.get(name).fn(logp, ref).mean().item()
        assert est == pytest.approx(true_kl, rel=0.02), name
    # seed 003's "k3": (r - 1) - log r with r = pi/pi_ref estimates KL(pi_ref || pi) instead
    r = (logp - ref).exp()
    wrong = ((r - 1) - r.log()).mean().item()
    assert abs(wrong - true_kl) > 0.1
