"""algo=ppo: a few real steps per critic layout, early stop, bad input, and the trainer state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rlx.errors import RlxError
from rlx.models import build_tiny_gpt
from rlx.tasks.sort import SortTask
from rlx.train import build, plan, train
from tests.conftest import TINY, TINY_RUN, compose_cfg

PPO_METRICS = {
    "loss/value",
    "value/mean",
    "value/explained_variance",
    "kl/ref",
    "kl/old",
    "kl/coef",
    "clip_frac",
    "entropy",
    "early_stop",
    "reward/mean",
    "loss/policy",
    "grad_norm",
}


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("layout", ["head", "separate"])
def test_ppo_trains_with_each_critic_layout(layout, tmp_path):
    cfg = compose_cfg(["algo=ppo", f"algo.critic={layout}", *TINY, "algo.epochs=2", "logger=none"])
    train(cfg, run_dir=tmp_path)
    logged = [r for r in rows(tmp_path) if "reward/mean" in r]
    assert len(logged) == 2 and PPO_METRICS <= set(logged[0])
    assert logged[0]["early_stop"] == 2.0  # epochs done, no early stop configured
    assert logged[0]["value/mean"] == 0.0  # the value head starts at zero
    assert logged[1]["value/mean"] != 0.0  # and has learned something after one update
    final = tmp_path / "final"
    AutoModelForCausalLM.from_pretrained(final)  # still a plain causal LM directory
    if layout == "head":
        assert (final / "value_head.safetensors").is_file()
    else:
        assert (final / "critic" / "value_head.safetensors").is_file()
        assert (final / "critic" / "config.json").is_file()


def test_tiny_policy_carries_a_value_head(tmp_path):
    train(compose_cfg(["algo=ppo", *TINY_RUN, "model=tiny_policy", "logger=none"]), run_dir=tmp_path)
    assert (tmp_path / "final" / "value_head.safetensors").is_file()


def test_kl_early_stop_skips_the_remaining_epochs(tmp_path):
    cfg = compose_cfg(
        ["algo=ppo", *TINY, "algo.epochs=3", "algo.minibatches=2", "algo.early_stop_kl=1e-9", "logger=none"]
    )
    session = build(cfg, run_dir=tmp_path)
    metrics = session.trainer.iteration()
    # the first minibatch sees pi = pi_old (KL ~ 0) and steps; the second sees KL > 1.5e-9 and stops
    assert metrics["early_stop"] == 0.5
    assert session.trainer.scheduler.last_epoch == 1  # one optimizer step instead of 6
    session.tracker.close()


def test_adaptive_kl_coefficient_moves(tmp_path):
    adaptive = ["kl.adaptive_target=1e-6", "kl.adaptive_horizon=100"]
    cfg = compose_cfg(["algo=ppo", "kl=k3", *TINY, "trainer.steps=3", *adaptive, "logger=none"])
    train(cfg, run_dir=tmp_path)
    logged = [r for r in rows(tmp_path) if "kl/coef" in r]
    coefs = [r["kl/coef"] for r in logged]
    # iteration 1: pi = pi_ref, KL ~ 0 < target: beta *= 1 - 0.2 * 16 / 100
    assert coefs[0] == 0.01 and coefs[1] == pytest.approx(0.01 * 0.968)
    # iteration 2: the policy has moved, KL > 1.2 x the tiny target: beta *= 1 + 0.2 * 16 / 100
    assert logged[1]["kl/ref"] > 1.2e-6 and coefs[2] == pytest.approx(coefs[1] * 1.032)


def test_ppo_state_round_trips(tmp_path):
    cfg = compose_cfg(["algo=ppo", "algo.critic=separate", "kl.adaptive_target=1.0", *TINY, "logger=none"])
    a = build(cfg, run_dir=tmp_path / "a")
    a.trainer.iteration()
    a.trainer.step = 1
    state = a.trainer.state_dict()
    torch.save(state, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)  # plain tensors and values only
    b = build(cfg, run_dir=tmp_path / "b")
    b.trainer.load_state_dict(state)
    assert b.trainer.step == 1
    assert b.trainer.kl_ctl.state_dict() == a.trainer.kl_ctl.state_dict()
    for (k, x), y in zip(
        a.trainer.critic.state_dict_for_resume().items(), b.trainer.critic.state_dict_for_resume().values()
    ):
        assert torch.equal(x, y), k
    sa, sb = a.trainer.critic_optimizer.state_dict(), b.trainer.critic_optimizer.state_dict()
    assert sa["state"].keys() == sb["state"].keys() and len(sa["state"]) > 0
    for i in sa["state"]:
        assert torch.equal(sa["state"][i]["exp_avg"], sb["state"][i]["exp_avg"])
    assert b.trainer.critic_scheduler.state_dict() == a.trainer.critic_scheduler.state_dict()
    a.tracker.close()
    b.tracker.close()


def test_ppo_bad_input_fails_before_training(tmp_path):
    with pytest.raises(RlxError, match=r"adv_norm=gae\); got adv_norm=group_std"):
        plan(compose_cfg(["algo=ppo", *TINY, "adv_norm=group_std"]))
    with pytest.raises(RlxError, match=r"kl\.placement=reward"):
        plan(compose_cfg(["algo=ppo", *TINY, "kl.placement=loss"]))
    with pytest.raises(RlxError, match=r"algo\.critic must be"):
        plan(compose_cfg(["algo=ppo", *TINY, "algo.critic=both"]))
    with pytest.raises(RlxError, match="cannot carry a value head"):
        build(compose_cfg(["algo=ppo", *TINY_RUN, "model=toy_sort", "logger=none"]), run_dir=tmp_path / "t")


def test_critic_checkpoint_of_the_wrong_shape_is_refused(tmp_path):
    other_vocab = tmp_path / "vocab12"
    build_tiny_gpt(SortTask(vocab=12, eval_size=4), n_layer=1, n_embd=32, n_head=2).save(other_vocab)
    cfg = ["algo=ppo", *TINY, "algo.critic=separate", "logger=none"]
    with pytest.raises(RlxError, match="vocabulary has 16 tokens, the policy's 14"):
        build(compose_cfg([*cfg, f"algo.critic_path={other_vocab}"]), run_dir=tmp_path / "a")
    bad_head = tmp_path / "badhead"
    build_tiny_gpt(SortTask(eval_size=4), n_layer=1, n_embd=32, n_head=2).save(bad_head)
    save_file({"weight": torch.zeros(1, 64), "bias": torch.zeros(1)}, bad_head / "value_head.safetensors")
    with pytest.raises(RlxError, match="does not fit a trunk of hidden size 32"):
        build(compose_cfg([*cfg, f"algo.critic_path={bad_head}"]), run_dir=tmp_path / "b")


def test_separate_critic_starts_from_a_previous_run(tmp_path):
    cfg = ["algo=ppo", *TINY, "algo.critic=separate", "logger=none"]
    train(compose_cfg(cfg), run_dir=tmp_path / "first")
    session = build(
        compose_cfg([*cfg, f"algo.critic_path={tmp_path / 'first' / 'final'}"]), run_dir=tmp_path / "b"
    )
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "first" / "final" / "critic" / "value_head.safetensors")
    assert torch.equal(session.trainer.critic.head.linear.weight.detach(), saved["weight"])
    session.tracker.close()
