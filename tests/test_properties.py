"""Property-based tests (hypothesis): every registered loss, advantage estimator, KL estimator and
aggregation is finite for finite inputs and ignores what sits at masked positions."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rlx.advantages import ADVANTAGES, generalized_advantage_estimate
from rlx.kl import KL_ESTIMATORS
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.policy import POLICY_LOSSES
from rlx.losses.value import clipped_value_loss

SETTINGS = settings(max_examples=40, deadline=None)
LOGP = st.floats(-30.0, 0.0, allow_nan=False)
VALUE = st.floats(-1e3, 1e3, allow_nan=False)


@st.composite
def batches(draw: st.DrawFn, min_group: int = 1) -> dict[str, torch.Tensor | int]:
    """A batch of completions: G per group, right-padded, each with at least one real token."""
    g = draw(st.integers(min_group, 4))
    n = g * draw(st.integers(1, 3))
    t = draw(st.integers(1, 6))
    lengths = draw(st.lists(st.integers(1, t), min_size=n, max_size=n))
    mask = torch.tensor([[1.0] * k + [0.0] * (t - k) for k in lengths])

    def grid(elements: st.SearchStrategy[float]) -> torch.Tensor:
        return torch.tensor(
            draw(st.lists(st.lists(elements, min_size=t, max_size=t), min_size=n, max_size=n))
        )

    return {
        "g": g,
        "mask": mask,
        "logp": grid(LOGP),
        "old": grid(LOGP),
        "other": grid(LOGP),
        "values": grid(VALUE),
        "noise": grid(VALUE),
        "outcome": torch.tensor(draw(st.lists(VALUE, min_size=n, max_size=n))),
    }


def scramble(x: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same tensor with other finite values wherever the mask is 0."""
    return torch.where(mask.bool(), x, noise)


@SETTINGS
@given(b=batches())
def test_kl_estimators_are_finite_and_ignore_masked_positions(b):
    for name in KL_ESTIMATORS.names():
        kl = KL_ESTIMATORS.get(name).fn
        out = kl(b["logp"], b["old"])
        assert torch.isfinite(out).all(), name
        moved = kl(scramble(b["logp"], b["other"], b["mask"]), b["old"])
        assert torch.equal(out * b["mask"], moved * b["mask"]), name


@SETTINGS
@given(b=batches())
def test_policy_losses_are_finite_and_ignore_masked_positions(b):
    adv = b["values"] / 100
    for name in POLICY_LOSSES.names():
        loss = POLICY_LOSSES.get(name).fn
        per_token, metrics = loss(b["logp"], b["old"], adv, b["mask"])
        assert torch.isfinite(per_token).all(), name
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values()), name
        moved, moved_metrics = loss(
            scramble(b["logp"], b["other"], b["mask"]),
            scramble(b["old"], b["other"], b["mask"]),
            scramble(adv, b["noise"], b["mask"]),
            b["mask"],
        )
        assert torch.equal(per_token * b["mask"], moved * b["mask"]), name
        assert {k: float(v) for k, v in metrics.items()} == {k: float(v) for k, v in moved_metrics.items()}


@SETTINGS
@given(b=batches())
def test_aggregations_are_finite_and_ignore_masked_positions(b):
    t = b["mask"].shape[1]
    for name in AGGREGATIONS.names():
        agg = AGGREGATIONS.get(name).fn
        out = agg(b["values"], b["mask"], max_len=t)
        assert torch.isfinite(out), name
        moved = agg(scramble(b["values"], b["noise"], b["mask"]), b["mask"], max_len=t)
        assert torch.equal(out, moved), name


@SETTINGS
@given(b=batches(min_group=2))
def test_advantages_are_finite_and_ignore_masked_positions(b):
    mask = b["mask"]
    for name in ADVANTAGES.names():
        entry = ADVANTAGES.get(name)
        if "values" in entry.meta.get("needs", ()):
            continue  # gae: its own test below
        fn = entry.fn
        per_token_only = entry.meta.get("token_rewards", False)
        for rewards in (b["outcome"], b["values"]):  # outcome and per-token (process) rewards
            if per_token_only and rewards.dim() == 1:
                continue  # reinforce_pp reads per-token rewards only
            adv = fn(rewards, b["g"], mask)
            assert torch.isfinite(adv).all(), name
            if rewards.dim() == 2:
                moved = fn(scramble(rewards, b["noise"], mask), b["g"], mask)
                assert torch.allclose(adv * mask, moved * mask, rtol=1e-5, atol=1e-5), name


@SETTINGS
@given(b=batches(), gamma=st.floats(0.0, 1.0), lam=st.floats(0.0, 1.0))
def test_gae_and_value_loss_are_finite_and_ignore_masked_positions(b, gamma, lam):
    mask = b["mask"]
    rewards, values = b["values"], b["other"]
    adv = generalized_advantage_estimate(rewards, 1, mask, values=values, gamma=gamma, lam=lam)
    returns = (adv + values) * mask
    assert torch.isfinite(adv).all() and torch.isfinite(returns).all()
    values2 = scramble(values, b["noise"], mask)
    adv2 = generalized_advantage_estimate(
        scramble(rewards, b["noise"], mask), 1, mask, values=values2, gamma=gamma, lam=lam
    )
    returns2 = (adv2 + values2) * mask
    assert torch.allclose(adv * mask, adv2 * mask) and torch.allclose(returns * mask, returns2 * mask)
    loss, metrics = clipped_value_loss(values, b["logp"], returns, mask, clip_range=0.2)
    assert torch.isfinite(loss).all() and all(torch.isfinite(torch.as_tensor(v)) for v in metrics.values())
    loss2, _ = clipped_value_loss(
        scramble(values, b["noise"], mask),
        scramble(b["logp"], b["noise"], mask),
        returns,
        mask,
        clip_range=0.2,
    )
    assert torch.equal(loss * mask, loss2 * mask)


@SETTINGS
@given(b=batches(), beta=st.floats(0.01, 10.0), eps=st.floats(0.0, 0.49))
def test_preference_losses_are_finite_and_sft_ignores_masked_positions(b, beta, eps):
    from rlx.losses.preference import PREFERENCE_LOSSES

    mask = b["mask"]
    seq = [(x * mask).sum(-1) for x in (b["logp"], b["old"], b["other"], b["logp"].flip(0))]
    scores = {"score_chosen": b["outcome"], "score_rejected": b["outcome"].flip(0)}
    kwargs = {"dpo": {"beta": beta, "label_smoothing": eps}, "ipo": {"beta": beta}, "spo": {"beta": beta}}
    for name in PREFERENCE_LOSSES.names():
        entry = PREFERENCE_LOSSES.get(name)
        inputs = entry.meta.get("inputs")
        if inputs in ("pairs", "scored_pairs"):
            extra = scores if inputs == "scored_pairs" else {}
            loss, metrics = entry.fn(*seq, **kwargs.get(name, {}), **extra)
        elif inputs == "reward_pairs":
            loss, metrics = entry.fn(seq[0] / 10, seq[1] / 10, margin=eps)
        else:
            loss, metrics = entry.fn(b["logp"], mask)
            moved, _ = entry.fn(scramble(b["logp"], b["other"], mask), mask)
            assert torch.equal(loss * mask, moved * mask) and torch.equal(
                loss * (1 - mask), moved * (1 - mask)
            )
        assert torch.isfinite(loss).all(), name
        assert all(torch.isfinite(torch.as_tensor(v)).all() for v in metrics.values()), name
