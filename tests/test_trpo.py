"""algo=trpo: conjugate gradient, the line search's KL bound, a few real steps, trainer state."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from rlx.checkpoint import list_checkpoints
from rlx.loops.trpo import backtracking_line_search, conjugate_gradient, trpo_update
from rlx.masked import masked_mean
from rlx.train import build, train
from tests.conftest import TINY, compose_cfg


def test_conjugate_gradient_solves_a_small_spd_system():
    a = torch.tensor([[4.0, 1.0, 0.0], [1.0, 3.0, 0.5], [0.0, 0.5, 2.0]])
    b = torch.tensor([1.0, 2.0, 3.0])
    x, iters = conjugate_gradient(lambda v: a @ v, b, iters=10)
    assert torch.allclose(a @ x, b, atol=1e-5) and iters <= 3


def test_line_search_never_accepts_a_step_that_breaks_the_kl_bound():
    # objective rises along the step, KL = 100 |theta|^2: only fractions with KL <= 0.01 may pass
    def evaluate(theta):
        return float(theta.sum()), float(100 * theta.square().sum())

    theta0 = torch.zeros(2)
    step = torch.tensor([1.0, 1.0])
    theta, frac, kl, gain = backtracking_line_search(theta0, step, evaluate, max_kl=0.01, max_backtracks=10)
    # KL at fraction f is 200 f^2: the first f = 0.5^k with 200 f^2 <= 0.01 is k = 8 (f = 1/256)
    assert frac == 0.5**8 and kl <= 0.01 and gain > 0
    assert evaluate(theta)[1] <= 0.01
    # when no fraction fits within max_backtracks, the old parameters are kept
    theta, frac, kl, gain = backtracking_line_search(theta0, step, evaluate, max_kl=1e-9, max_backtracks=5)
    assert torch.equal(theta, theta0) and frac == 0.0
    # a step that lowers the objective is never accepted, however small its KL
    theta, frac, _, _ = backtracking_line_search(theta0, -step, evaluate, max_kl=1.0, max_backtracks=10)
    assert torch.equal(theta, theta0) and frac == 0.0


def _exact_kl(old_model, trainer, ro) -> float:
    t = trainer.sampling.temperature
    with torch.no_grad():
        args = (ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
        new = torch.log_softmax(trainer.policy.completion_logits(*args).float() / t, -1)
        saved = trainer.policy.model
        trainer.policy.model = old_model
        old = torch.log_softmax(trainer.policy.completion_logits(*args).float() / t, -1)
        trainer.policy.model = saved
    return masked_mean((old.exp() * (old - new)).sum(-1), ro.mask).item()


@pytest.mark.parametrize("delta", [1e-6, 1e-3])
def test_a_trpo_step_stays_inside_the_trust_region(delta, tmp_path):
    cfg = compose_cfg(["algo=trpo", *TINY, f"algo.max_kl={delta}", "logger=none"])
    session = build(cfg, run_dir=tmp_path)
    trainer = session.trainer
    batch = trainer.collect()  # the loop's stages up to the update, then the update rule alone
    trainer.shape(batch, beta=0.0)
    trainer.estimate(batch)
    old_model = copy.deepcopy(trainer.policy.model)
    metrics = trpo_update(trainer.learner, batch, step=0, kl_coef=0.0)
    kl = _exact_kl(old_model, trainer, batch.rollout)
    assert metrics["trpo/step_size"] > 0  # a step was taken ...
    assert kl <= delta * (1 + 1e-3)  # ... and it respects the bound, measured independently
    assert kl == pytest.approx(metrics["trpo/kl"], rel=1e-3, abs=1e-9)
    session.tracker.close()


def test_trpo_trains_checkpoints_and_round_trips(tmp_path):
    cfg = compose_cfg(["algo=trpo", *TINY, "trainer.save_every=2", "logger=none"])
    train(cfg, run_dir=tmp_path / "run")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"trpo/step_size", "trpo/kl", "trpo/cg_iters", "reward/mean", "entropy"} <= set(rows[0])
    assert (list_checkpoints(tmp_path / "run" / "checkpoints")[-1] / "trainer_state.pt").is_file()
    a = build(cfg, run_dir=tmp_path / "a")
    a.trainer.iteration()
    a.trainer.step = 1
    torch.save(a.trainer.state_dict(), tmp_path / "loop.pt")
    state = torch.load(tmp_path / "loop.pt", weights_only=True)
    b = build(cfg, run_dir=tmp_path / "b")
    b.trainer.load_state_dict(state)
    assert b.trainer.step == 1
    a.tracker.close()
    b.tracker.close()


def test_trpo_with_a_separate_critic_fits_it_on_gae_returns(tmp_path):
    """The same loop with algo.update=trpo and a critic: GAE advantages, the critic regressed after
    the policy's natural-gradient step (Schulman et al. 2016's TRPO + GAE)."""
    cfg = compose_cfg(["algo=trpo", "algo.critic=separate", "adv_norm=gae", *TINY, "logger=none"])
    train(cfg, run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "trpo/step_size" in r]
    assert len(logged) == 2 and {"loss/value", "value/explained_variance", "trpo/kl"} <= set(logged[0])
    assert logged[0]["value/mean"] == 0.0 and logged[1]["value/mean"] != 0.0  # the critic learned
    assert logged[0]["trpo/step_size"] > 0
    assert (tmp_path / "final" / "critic" / "value_head.safetensors").is_file()


def test_trpo_refuses_a_value_head_on_the_trunk_it_moves():
    from rlx.errors import RlxError
    from rlx.train import plan

    with pytest.raises(RlxError, match=r"use algo\.critic=separate"):
        plan(compose_cfg(["algo=trpo", "algo.critic=head", "adv_norm=gae", *TINY]))
    with pytest.raises(RlxError, match="needs the critic's values"):
        plan(compose_cfg(["algo=trpo", "adv_norm=gae", *TINY]))
