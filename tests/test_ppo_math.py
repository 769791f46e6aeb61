"""GAE, the clipped value loss and the adaptive KL controller against hand-computed values."""

from __future__ import annotations

import pytest
import torch

from rlx.advantages import generalized_advantage_estimate
from rlx.kl import KLController
from rlx.losses.value import clipped_value_loss, explained_variance


def gae(rewards, values, mask, **hp):
    """GAE's advantages and the returns the critic regresses on, R = A + V (masked), as the loop
    forms them."""
    adv = generalized_advantage_estimate(rewards, 1, mask, values=values, **hp)
    return adv, (adv + values.detach().float()) * mask


def test_gae_by_hand_with_masking():
    # gamma 0.9, lambda 0.8; the 4th token is padding: its reward and value (9) must not count
    rewards = torch.tensor([[0.0, 0.0, 1.0, 5.0]])
    values = torch.tensor([[0.5, 0.4, 0.3, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # t=2: delta = 1 - 0.3 = 0.7 (V after the last real token is 0)
    # t=1: delta = 0.9*0.3 - 0.4 = -0.13; A = -0.13 + 0.72*0.7 = 0.374
    # t=0: delta = 0.9*0.4 - 0.5 = -0.14; A = -0.14 + 0.72*0.374 = 0.12928
    assert adv.tolist()[0] == pytest.approx([0.12928, 0.374, 0.7, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.62928, 0.774, 1.0, 0.0])


def test_gae_with_gamma_and_lambda_one_is_monte_carlo_minus_value():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [0.0, 5.0, 7.0]])
    values = torch.tensor([[0.5, 1.0, 2.0], [1.0, 2.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [pytest.approx([5.5, 4.0, 1.0]), pytest.approx([4.0, 3.0, 0.0])]
    assert ret.tolist() == [pytest.approx([6.0, 5.0, 3.0]), pytest.approx([5.0, 5.0, 0.0])]


def test_gae_with_lambda_zero_is_the_one_step_td_error():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.2, 0.6]])
    adv, _ = gae(rewards, values, torch.ones(1, 2), gamma=0.5, lam=0.0)
    assert adv.tolist()[0] == pytest.approx([0.5 * 0.6 - 0.2, 1.0 - 0.6])


def test_gae_carries_no_gradient():
    values = torch.tensor([[0.2, 0.6]], requires_grad=True)
    adv, ret = gae(torch.ones(1, 2), values, torch.ones(1, 2))
    assert not adv.requires_grad and not ret.requires_grad


def test_value_loss_clipping_by_hand():
    values = torch.tensor([[1.5, 0.5, 1.1, 3.0]], requires_grad=True)
    old = torch.tensor([[1.0, 1.0, 1.0, 1.0]])
    returns = torch.tensor([[2.0, 0.0, 0.0, 4.0]])
    mask = torch.ones(1, 4)
    loss, metrics = clipped_value_loss(values, old, returns, mask, clip_range=0.2)
    # 1: max(0.25, (1.2-2)^2 = 0.64); 2: max(0.25, 0.8^2); 3: inside the clip: 1.21; 4: max(1, 2.8^2)
    assert loss.tolist()[0] == pytest.approx([0.32, 0.32, 0.605, 3.92])
    assert metrics["value/clip_frac"].item() == pytest.approx(0.75)
    loss.sum().backward()
    # where the clipped term wins and V is outside the clip range, no gradient reaches V
    assert values.grad.tolist()[0] == pytest.approx([0.0, 0.0, 1.1, 0.0])
    unclipped, _ = clipped_value_loss(values, old, returns, mask, clip_range=None)
    assert unclipped.tolist()[0] == pytest.approx([0.125, 0.125, 0.605, 0.5])


def test_explained_variance():
    mask = torch.ones(1, 4)
    r = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert explained_variance(r, r, mask) == pytest.approx(1.0)
    assert explained_variance(torch.full_like(r, 2.5), r, mask) == pytest.approx(0.0)


def test_adaptive_kl_controller_update_by_hand():
    ctl = KLController(0.1, target=6.0, horizon=10000)
    # KL 9 is 50% over target: the error is clipped to +0.2; beta *= 1 + 0.2 * 256 / 10000
    assert ctl.update(9.0, n=256) == pytest.approx(0.1 * 1.00512)
    # KL 5.4 is 10% under: beta *= 1 - 0.1 * 256 / 10000
    assert ctl.update(5.4, n=256) == pytest.approx(0.1 * 1.00512 * 0.99744)
    fixed = KLController(0.1)
    assert fixed.update(100.0, n=256) == 0.1 and not fixed.adaptive
    copy = KLController(1.0, target=1.0)
    copy.load_state_dict(ctl.state_dict())
    assert copy.state_dict() == ctl.state_dict()
