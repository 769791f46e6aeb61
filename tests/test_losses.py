"""Policy losses and aggregation: hand values, padding, micro-batching, seed 000's walk-through."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.errors import RlxError
from rlx.kl import KL_ESTIMATORS
from rlx.losses.aggregation import AGGREGATIONS
from rlx.losses.entropy import token_entropy
from rlx.losses.policy import POLICY_LOSSES


def clipped(**kw):
    return POLICY_LOSSES.resolve({"name": "clipped", **kw}, where="loss")


def pg():
    return POLICY_LOSSES.resolve({"name": "pg"}, where="loss")


def test_pg_is_minus_advantage_times_logp():
    logp = torch.tensor([[-1.0, -2.0]])
    loss, _ = pg()(logp, logp.detach(), torch.tensor([[0.5, -1.0]]), torch.ones(1, 2))
    assert loss.tolist() == [[0.5, -2.0]]


@pytest.mark.parametrize(
    ("ratio", "adv", "expected", "clipped_active"),
    [
        (1.0, 1.0, -1.0, False),  # on-policy: -ratio * A
        (1.5, 1.0, -1.2, True),  # A > 0, ratio above 1 + eps: clipped to 1.2
        (0.5, 1.0, -0.5, False),  # A > 0, ratio below 1 - eps: unclipped (pessimistic min)
        (0.5, -1.0, 0.8, True),  # A < 0, ratio below 1 - eps: clipped to 0.8
        (1.5, -1.0, 1.5, False),  # A < 0, ratio above: unclipped
    ],
)
def test_clipped_surrogate_hand_values(ratio, adv, expected, clipped_active):
    logp = torch.tensor([[math.log(ratio)]], requires_grad=True)
    old = torch.zeros(1, 1)
    loss, metrics = clipped()(logp, old, torch.tensor([[adv]]), torch.ones(1, 1))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["clip_frac"].item() == float(clipped_active)
    loss.sum().backward()
    # the gradient vanishes exactly where the clip is active
    assert (logp.grad.abs().item() == 0) == clipped_active


def test_clip_higher_is_asymmetric():
    logp = torch.tensor([[math.log(1.25)]])
    loss, _ = clipped(eps_low=0.2, eps_high=0.28)(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.25)  # inside [0.8, 1.28]: not clipped


def test_dual_clip_bounds_negative_advantages():
    logp = torch.tensor([[math.log(10.0)]])
    loss, _ = clipped(dual_clip=3.0)(logp, torch.zeros(1, 1), -torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(3.0)  # min(10, 3 * 1)
    loss, _ = clipped(dual_clip=3.0)(logp, torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-1.2)  # positive advantages are untouched


def test_ratio_is_exp_of_logp_difference_not_a_quotient_of_logps():
    # The lecture's compute_loss divides log-probs; with logp=-1, old=-2 that "ratio" would be 0.5.
    logp, old = torch.tensor([[-1.0]]), torch.tensor([[-2.0]])
    loss, _ = clipped(eps_low=0.9, eps_high=9.0)(logp, old, torch.ones(1, 1), torch.ones(1, 1))
    assert loss.item() == pytest.approx(-math.e)


def test_kl_old_metric_is_k3_of_old_vs_new():
    logp, old = torch.tensor([[0.1, 9.0]]), torch.tensor([[0.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])
    _, metrics = clipped()(logp, old, torch.ones(1, 2), mask)
    assert metrics["kl/old"].item() == pytest.approx(math.exp(0.1) - 1 - 0.1)


def test_bad_hyperparameters_fail():
    with pytest.raises(RlxError, match="dual_clip"):
        clipped(dual_clip=0.5)(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1))


# --- aggregation -------------------------------------------------------------------------------
L = torch.tensor([[1.0, 2.0, 3.0], [4.0, 0.0, 0.0]])
M = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("token_mean", (1 + 2 + 3 + 4) / 4),
        ("seq_mean_token_mean", (2.0 + 4.0) / 2),
        ("seq_mean_token_sum", (6.0 + 4.0) / 2),
        ("seq_mean_token_sum_norm", (6.0 + 4.0) / (2 * 3)),
    ],
)
def test_aggregation_hand_values(name, expected):
    assert AGGREGATIONS.get(name).fn(L, M).item() == pytest.approx(expected)


def test_dr_grpo_normaliser_is_a_constant():
    assert AGGREGATIONS.get("seq_mean_token_sum_norm").fn(L, M, max_len=10).item() == pytest.approx(0.5)


@pytest.mark.parametrize(
    "name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
)
def test_padding_never_changes_the_loss(name):
    fn = AGGREGATIONS.get(name).fn
    padded = torch.cat([L, torch.full((2, 4), float("nan"))], dim=1)  # garbage (even NaN) in padding
    padded_mask = torch.cat([M, torch.zeros(2, 4)], dim=1)
    kw = {"max_len": 3}
    assert fn(padded, padded_mask, **kw).item() == pytest.approx(fn(L, M, **kw).item())


@pytest.mark.parametrize(
    "name", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum", "seq_mean_token_sum_norm"]
)
def test_micro_batches_sum_to_the_minibatch_loss(name):
    torch.manual_seed(0)
    per_token = torch.randn(8, 5)
    mask = (torch.rand(8, 5) > 0.3).float()
    mask[:, 0] = 1
    fn = AGGREGATIONS.get(name).fn
    whole = fn(per_token, mask, max_len=5)
    tokens, seqs = mask.sum().item(), 8
    parts = sum(fn(per_token[i : i + 3], mask[i : i + 3], tokens, seqs, max_len=5) for i in range(0, 8, 3))
    assert parts.item() == pytest.approx(whole.item(), rel=1e-6)
    # the naive per-micro-batch normalisation would differ:
    naive = sum(
        fn(per_token[i : i + 3], mask[i : i + 3], max_len=5) * len(per_token[i : i + 3]) / 8
        for i in range(0, 8, 3)
    )
    if name == "token_mean":
        assert naive.item() != pytest.approx(whole.item(), rel=1e-6)


def test_entropy():
    uniform = torch.zeros(1, 1, 4)
    assert token_entropy(uniform).item() == pytest.approx(math.log(4))
    peaked = torch.tensor([[[100.0, 0.0, 0.0]]])
    assert token_entropy(peaked).item() == pytest.approx(0.0, abs=1e-6)


# --- seed 000's walk-through ---------------------------------------------------------------------
# A bias-free linear "model" maps one-hot time steps (T = 3) to logits over 5 tokens; the chosen
# tokens are (2, 1, 4). The seed prints P before = (0.1737, 0.2043, 0.1945) and, after one SGD step
# (lr 0.5) on L = -A sum_t log pi(a_t) with A = 0.4, P after = (0.2055, 0.2386, 0.2280).
W0 = torch.tensor(
    [
        [0.0604, 0.0811, -0.0045],
        [0.0880, 0.1048, -0.0045],
        [-0.0723, 0.2866, -0.0566],
        [0.0160, -0.0025, 0.1074],
        [0.2263, -0.0918, -0.0225],
    ]
)
CHOSEN = torch.tensor([[2, 1, 4]])


def _walkthrough(advantage: float) -> tuple[list[float], list[float]]:
    model = torch.nn.Linear(3, 5, bias=False)
    with torch.no_grad():
        model.weight.copy_(W0)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)

    def chosen_probs() -> torch.Tensor:
        logits = model(torch.eye(3)).unsqueeze(0)  # [1, T, V]
        return torch.log_softmax(logits, -1).gather(-1, CHOSEN.unsqueeze(-1)).squeeze(-1)

    before = chosen_probs().exp().flatten().tolist()
    logp = chosen_probs()
    mask = torch.ones(1, 3)
    per_token, _ = pg()(logp, logp.detach(), torch.full((1, 3), advantage), mask)
    loss = AGGREGATIONS.get("seq_mean_token_sum").fn(per_token, mask)  # = -A * sum_t log pi
    opt.zero_grad()
    loss.backward()
    opt.step()
    return before, chosen_probs().exp().flatten().tolist()


def test_seed_000_walkthrough_positive_advantage_raises_chosen_tokens():
    before, after = _walkthrough(0.4)
    assert before == pytest.approx([0.1737, 0.2043, 0.1945], abs=1e-4)
    assert after == pytest.approx([0.2055, 0.2386, 0.2280], abs=2e-4)
    assert all(a > b for a, b in zip(after, before))


def test_seed_000_walkthrough_negative_advantage_lowers_chosen_tokens():
    before, after = _walkthrough(-0.4)
    assert all(a < b for a, b in zip(after, before))


def test_gspo_uses_the_length_normalised_sequence_ratio_clipped_per_sequence():
    """GSPO (Zheng et al. 2025) by hand: s_i = exp(mean_t(logp - old_logp)), clipped per sequence."""
    gspo = POLICY_LOSSES.get("gspo").fn
    old = torch.tensor([[-1.0, -2.0], [-1.5, -0.7]])
    logp = (old + torch.tensor([[0.1, -0.3], [0.2, 0.0]])).requires_grad_(True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    adv = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, metrics = gspo(logp, old, adv, mask)
    s0, s1 = math.exp(-0.1), math.exp(0.2)  # sequence 1 has one real token
    assert loss[0].tolist() == pytest.approx([-s0, -s0], rel=1e-6)  # s0 < 1 - eps: min picks s0 * A
    assert loss[1, 0].item() == pytest.approx(-(1 + 4e-4), rel=1e-6)  # s1 > 1 + eps_high: clipped
    assert metrics["clip_frac"].item() == pytest.approx(0.5)
    agg = AGGREGATIONS.get("seq_mean_token_mean").fn(loss, mask)
    agg.backward()
    # (1/2) * L_0 with dL_0/dlogp_t = -A * s0 / |y_0|; the clipped sequence gives no gradient
    assert logp.grad[0].tolist() == pytest.approx([-s0 / 4, -s0 / 4], rel=1e-5)
    assert logp.grad[1].tolist() == [0.0, 0.0]
    assert s1 > 1 + 4e-4


def _per_token_changes(fn, logp: torch.Tensor, t: int) -> torch.Tensor:
    """Where ``fn(logp)`` changes when only token ``t`` of row 0 moves."""
    moved = logp.clone()
    moved[0, t] += 0.3
    return (fn(moved) - fn(logp)).abs() > 1e-9


def test_the_pieces_declared_token_local_or_linear_are():
    """What the fused head relies on (`FusedLoss`): a policy loss or KL estimator registered
    ``token_local`` changes only the token whose log-prob moved; an aggregation registered ``linear``
    is linear in the per-token values. GSPO, not declared, is seen to fail the probe."""
    torch.manual_seed(0)
    logp, old, ref = -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3, -torch.rand(3, 5) * 3
    adv = torch.randn(3, 1).expand(3, 5).clone()
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    declared = [
        POLICY_LOSSES.get(n) for n in POLICY_LOSSES.names() if POLICY_LOSSES.get(n).meta.get("token_local")
    ]
    assert {e.name for e in declared} == {"pg", "clipped"}
    for entry in declared:
        for t in range(5):
            changed = _per_token_changes(lambda lp, f=entry.fn: f(lp, old, adv, mask)[0], logp, t)
            changed[0, t] = False
            assert not changed.any(), entry.name  # (the token itself may sit in the clipped range)
    from rlx.losses.preference import PREFERENCE_LOSSES

    offline = [
        e for n in PREFERENCE_LOSSES.names() if (e := PREFERENCE_LOSSES.get(n)).meta.get("token_local")
    ]
    assert [e.name for e in offline] == ["sft_nll"]
    changed = _per_token_changes(lambda lp: offline[0].fn(lp, mask)[0], logp, 2)
    assert changed.sum() == 1 and changed[0, 2]
    gspo = POLICY_LOSSES.get("gspo")
    assert not gspo.meta.get("token_local")
    wide = lambda lp: gspo.fn(lp, logp, adv, mask, eps_low=0.5, eps_high=0.5)[0]  # noqa: E731
    assert _per_token_changes(wide, logp, 0).sum() > 1  # the whole sequence's loss moves
    kls = [KL_ESTIMATORS.get(n) for n in KL_ESTIMATORS.names()]
    assert kls and all(e.meta.get("token_local") for e in kls)
    for entry in kls:
        changed = _per_token_changes(lambda lp, f=entry.fn: f(lp, ref), logp, 2)
        assert changed.sum() == 1 and changed[0, 2], entry.name
    aggs = [AGGREGATIONS.get(n) for n in AGGREGATIONS.names()]
    assert aggs and all(e.meta.get("linear") for e in aggs)
    x, y = torch.randn(3, 5), torch.randn(3, 5)
    for entry in aggs:
        agg = lambda v, f=entry.fn: f(v, mask, 11.0, 3, max_len=5)  # noqa: E731
        assert torch.allclose(agg(2.0 * x - 0.5 * y), 2.0 * agg(x) - 0.5 * agg(y), atol=1e-6), entry.name
