"""Advantage estimators against hand-computed values, outcome and per-token."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.advantages import ADVANTAGES, frac_zero_std_groups

# Two groups of G = 3: rewards (1, 2, 3) and (5, 5, 5); completions of 2 tokens, one padded.
R = torch.tensor([1.0, 2.0, 3.0, 5.0, 5.0, 5.0])
MASK = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [1, 0]], dtype=torch.float32)


def adv(name: str, rewards=R, mask=MASK, g: int = 3, **kw):
    return ADVANTAGES.resolve({"name": name, **kw}, where="adv_norm")(rewards, g, mask)


def per_seq(a: torch.Tensor) -> list[float]:
    """The advantage of each completion (first token), checking it is constant over real tokens."""
    for row, m in zip(a, MASK):
        real = row[m.bool()]
        assert torch.allclose(real, real[0].expand_as(real))
        assert (row[~m.bool()] == 0).all(), "padding must carry no advantage"
    return a[:, 0].tolist()


def test_none_is_the_reward():
    assert per_seq(adv("none")) == pytest.approx([1, 2, 3, 5, 5, 5])


def test_center_subtracts_group_mean():
    assert per_seq(adv("center")) == pytest.approx([-1, 0, 1, 0, 0, 0])


def test_group_std_uses_unbiased_std_and_zeroes_flat_groups():
    # group 1: mean 2, unbiased std 1 -> (-1, 0, 1) / (1 + 1e-6); group 2: all equal -> 0
    expected = [-1 / (1 + 1e-6), 0, 1 / (1 + 1e-6), 0, 0, 0]
    assert per_seq(adv("group_std")) == pytest.approx(expected, abs=1e-7)


def test_group_std_eps_is_a_hyperparameter():
    out = per_seq(adv("group_std", eps=1.0))
    assert out[0] == pytest.approx(-0.5)


def test_batch_std_divides_centred_rewards_by_their_batch_std():
    centred = torch.tensor([-1.0, 0, 1, 0, 0, 0])
    std = centred.std().item()  # unbiased over the 6 completions
    assert per_seq(adv("batch_std")) == pytest.approx((centred / (std + 1e-6)).tolist(), abs=1e-6)


def test_rloo_is_leave_one_out():
    # r_i - mean of the others: 1 - 2.5, 2 - 2, 3 - 1.5; G/(G-1) (r - mean) gives the same
    assert per_seq(adv("rloo")) == pytest.approx([-1.5, 0, 1.5, 0, 0, 0])


def test_max_keeps_only_the_group_maximum():
    assert per_seq(adv("max")) == pytest.approx([0, 0, 3, 5, 5, 5])


def test_advantages_carry_no_gradient():
    r = R.clone().requires_grad_(True)
    assert not adv("group_std", rewards=r).requires_grad


def test_process_rewards_are_normalised_position_by_position():
    # G = 2, one group, 3 positions; the second completion stops after 2 tokens.
    rewards = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 7.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    out = ADVANTAGES.get("center").fn(rewards, 2, mask)
    # position 0: mean 0.5 -> (0.5, -0.5); position 1: equal -> 0; position 2: only row 0 -> 0
    assert torch.allclose(out, torch.tensor([[0.5, 0.0, 0.0], [-0.5, 0.0, 0.0]]))
    std = ADVANTAGES.get("group_std").fn(rewards, 2, mask)
    s = math.sqrt(0.5)  # unbiased std of (1, 0)
    assert std[:, 0].tolist() == pytest.approx([0.5 / (s + 1e-6), -0.5 / (s + 1e-6)])
    assert std[1, 2] == 0  # padding, even though its reward (7) was garbage


def test_rloo_process_counts_only_present_completions():
    rewards = torch.tensor([[2.0, 4.0], [0.0, 9.0], [1.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    out = ADVANTAGES.get("rloo").fn(rewards, 3, mask)
    assert out[:, 0].tolist() == pytest.approx([2 - 0.5, 0 - 1.5, 1 - 1.0])
    assert out[:, 1].tolist() == pytest.approx([4.0, 0.0, -4.0])  # leave-one-out over the 2 present


def test_group_size_must_divide_the_batch():
    with pytest.raises(Exception, match="groups of 4"):
        adv("center", g=4)


def test_frac_zero_std_groups():
    assert frac_zero_std_groups(R, 3) == 0.5


def test_reinforce_pp_is_the_per_token_return_whitened_over_the_batch():
    """REINFORCE++ (Hu 2025) by hand: returns of the shaped token rewards, then batch whitening."""
    fn = ADVANTAGES.get("reinforce_pp").fn
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    # outcome 1.0 on the last real token of row 0, -beta*KL on every token; row 1 a process reward
    rewards = torch.tensor([[-0.1, -0.2, 0.9], [0.0, 0.5, 0.0]])
    returns = [0.6, 0.7, 0.9, 0.5, 0.5]  # sum of the rewards from t on (gamma = 1), real tokens
    mean = sum(returns) / 5  # 0.64
    std = (sum((r - mean) ** 2 for r in returns) / 4) ** 0.5  # unbiased, 0.167332
    want = torch.tensor([[0.6, 0.7, 0.9], [0.5, 0.5, mean]]) - mean
    adv = fn(rewards, 1, mask)
    assert torch.allclose(adv, want / std * mask, atol=1e-5)
    assert adv[1, 2] == 0 and not adv.requires_grad
    # a discount: row 0's first return is -0.1 + 0.5 * (-0.2 + 0.5 * 0.9) = 0.025
    half = fn(rewards, 1, mask, gamma=0.5)
    r = [0.025, 0.25, 0.9, 0.25, 0.5]
    m = sum(r) / 5
    s = (sum((x - m) ** 2 for x in r) / 4) ** 0.5
    assert half[0, 0].item() == pytest.approx((0.025 - m) / s, rel=1e-4)


def test_gae_needs_values_and_reads_token_rewards():
    entry = ADVANTAGES.get("gae")
    assert entry.meta["needs"] == ("values",) and entry.meta["token_rewards"]
    assert ADVANTAGES.get("reinforce_pp").meta["token_rewards"]
    assert "needs" not in ADVANTAGES.get("group_std").meta
