"""Offline losses against hand-computed values (ALGORITHMS.md, "Preference and supervised losses")."""

from __future__ import annotations

import math

import pytest
import torch

from rlx.errors import RlxError
from rlx.losses.aggregation import token_mean
from rlx.losses.preference import PREFERENCE_LOSSES

# one pair: logp_c = -1, logp_l = -2, ref_c = ref_l = -1.5, so the log-ratios are +0.5 and -0.5
LOGP_C, LOGP_L, REF_C, REF_L = (torch.tensor([x]) for x in (-1.0, -2.0, -1.5, -1.5))


def softplus(x: float) -> float:  # -log sigmoid(-x) = log(1 + e^x)
    return math.log1p(math.exp(x))


def test_dpo_without_label_smoothing():
    dpo = PREFERENCE_LOSSES.resolve({"name": "dpo", "beta": 0.5}, where="algo.loss")
    loss, m = dpo(LOGP_C, LOGP_L, REF_C, REF_L)
    # z = 0.5 * (0.5 - (-0.5)) = 0.5; L = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert m["rewards/chosen"].item() == pytest.approx(0.25)
    assert m["rewards/rejected"].item() == pytest.approx(-0.25)
    assert m["rewards/margin"].item() == pytest.approx(0.5)
    assert m["rewards/accuracy"].item() == 1.0


def test_dpo_with_label_smoothing_is_cdpo():
    dpo = PREFERENCE_LOSSES.resolve({"name": "dpo", "beta": 0.5, "label_smoothing": 0.1}, where="algo.loss")
    loss, _ = dpo(LOGP_C, LOGP_L, REF_C, REF_L)
    # 0.9 * log(1 + e^-0.5) + 0.1 * log(1 + e^0.5) = 0.9 * 0.474077 + 0.1 * 0.974077
    assert loss.item() == pytest.approx(0.9 * 0.474077 + 0.1 * 0.974077, abs=1e-6)
    assert loss.item() == pytest.approx(0.9 * softplus(-0.5) + 0.1 * softplus(0.5), abs=1e-6)


def test_dpo_gradient_raises_chosen_and_lowers_rejected():
    c = LOGP_C.clone().requires_grad_(True)
    r = LOGP_L.clone().requires_grad_(True)
    loss, _ = PREFERENCE_LOSSES.get("dpo").fn(c, r, REF_C, REF_L, beta=0.5)
    loss.sum().backward()
    sig = 1 / (1 + math.exp(-0.5))
    assert c.grad.item() == pytest.approx(-0.5 * (1 - sig), abs=1e-6)  # descent raises logp_c
    assert r.grad.item() == pytest.approx(0.5 * (1 - sig), abs=1e-6)


def test_ipo_pulls_the_gap_to_one_over_two_beta():
    ipo = PREFERENCE_LOSSES.get("ipo").fn
    # h = 0.5 - (-0.5) = 1
    assert ipo(LOGP_C, LOGP_L, REF_C, REF_L, beta=0.5)[0].item() == pytest.approx(0.0)  # (1 - 1)^2
    assert ipo(LOGP_C, LOGP_L, REF_C, REF_L, beta=0.25)[0].item() == pytest.approx(1.0)  # (1 - 2)^2
    assert ipo(LOGP_C, LOGP_L, REF_C, REF_L, beta=1.0)[0].item() == pytest.approx(0.25)  # (1 - 0.5)^2


def test_spo_weights_the_log_ratio_gap_by_the_score_gap():
    spo = PREFERENCE_LOSSES.get("spo").fn
    scores = {"score_chosen": torch.tensor([0.75]), "score_rejected": torch.tensor([0.25])}
    ref_c, ref_l = torch.tensor([-1.0]), torch.tensor([-1.5])
    # with the reference: h_a = 0, h_b = -0.5, gap 0.5; L = -(0.75 - 0.25) * 1 * 0.5 = -0.25
    assert spo(LOGP_C, LOGP_L, ref_c, ref_l, **scores)[0].item() == pytest.approx(-0.25)
    assert spo(LOGP_C, LOGP_L, ref_c, ref_l, **scores, beta=2.0)[0].item() == pytest.approx(-0.5)
    # the seed's form (no reference): gap logp_a - logp_b = 1; L = -0.5
    assert spo(LOGP_C, LOGP_L, ref_c, ref_l, **scores, reference=False)[0].item() == pytest.approx(-0.5)
    # equal scores: no signal at all
    same = {"score_chosen": torch.tensor([0.5]), "score_rejected": torch.tensor([0.5])}
    assert spo(LOGP_C, LOGP_L, ref_c, ref_l, **same)[0].item() == 0.0


def test_rm_pairwise_with_and_without_margin():
    rm = PREFERENCE_LOSSES.get("rm_pairwise").fn
    rc, rl = torch.tensor([1.0, 0.0]), torch.tensor([0.5, 1.0])
    loss, m = rm(rc, rl)
    # -log sigmoid(0.5) = 0.474077; -log sigmoid(-1) = log(1 + e) = 1.313262
    assert loss.tolist() == pytest.approx([0.474077, 1.313262], abs=1e-6)
    assert m["rm/accuracy"].item() == 1.0  # one of two pairs ranked right (a sum over pairs)
    assert m["rm/margin"].item() == pytest.approx(-0.5)
    loss, _ = rm(rc, rl, margin=1.0)
    # -log sigmoid(0.5 - 1) = log(1 + e^0.5) = 0.974077; -log sigmoid(-2) = 2.126928
    assert loss.tolist() == pytest.approx([0.974077, 2.126928], abs=1e-6)


def test_sft_nll_counts_completion_tokens_only():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-4.0, -0.5, float("nan")]])
    mask = torch.tensor([[0.0, 1.0, 1.0], [1.0, 1.0, 0.0]])  # a prompt-side 0 and a padded NaN
    per_token, _ = PREFERENCE_LOSSES.get("sft_nll").fn(logp, mask)
    assert per_token[0].tolist() == [0.0, 2.0, 3.0]
    assert token_mean(per_token, mask).item() == pytest.approx((2 + 3 + 4 + 0.5) / 4)


def test_unknown_key_and_bad_values_fail_in_one_line():
    with pytest.raises(RlxError, match="valid keys: beta, label_smoothing"):
        PREFERENCE_LOSSES.resolve({"name": "dpo", "betta": 0.1}, where="algo.loss")
    with pytest.raises(RlxError, match=r"algo.loss.beta must be float"):
        PREFERENCE_LOSSES.resolve({"name": "dpo", "beta": "high"}, where="algo.loss")
    # the online losses live in their own registry
    with pytest.raises(RlxError, match="unknown offline loss 'clipped'"):
        PREFERENCE_LOSSES.resolve({"name": "clipped"}, where="algo.loss")
