"""trainer.precision=bf16 (autocast, fp32 master weights) and trainer.reference_dtype=bf16, on CPU.

This CPU has no bf16 units, so nothing here is about speed: the tests check that bf16 is really used
where it should be, that what must stay float32 does, and that the bf16 update follows the fp32 one.
"""

from __future__ import annotations

import copy

import pytest
import torch

from rlx.data.sort import write_sort_data
from rlx.errors import RlxError
from rlx.loops.update import sgd_update
from rlx.losses.policy import POLICY_LOSSES
from rlx.models import build_tiny_gpt
from rlx.models.policy import Sampling
from rlx.tasks.sort import SortTask
from rlx.train import plan
from tests.conftest import compose_cfg
from tests.test_update import MASK, TOKENS, fixed_batch, learner_for


@pytest.fixture
def policy():
    torch.manual_seed(0)
    return build_tiny_gpt(SortTask(eval_size=4), n_layer=1, n_embd=32, n_head=2)


def _inputs(policy):
    ids, pmask = policy.encode(policy.task.train_batch(0, 4).prompts)
    return ids, pmask, TOKENS, MASK


def test_bf16_scores_are_float32_tensors_computed_in_bf16(policy):
    args = _inputs(policy)
    with torch.no_grad():
        fp32 = policy.score(*args).logp
        policy.autocast_dtype = torch.bfloat16
        bf16 = policy.score(*args).logp
    assert bf16.dtype == torch.float32  # log-probs are accumulated in float32 whatever the autocast
    gap = (bf16 - fp32).abs().max().item()
    assert 0 < gap < 0.1, gap  # bf16 really ran (not bit-equal), and stayed close (8-bit mantissa)


def test_bf16_update_keeps_fp32_master_weights_and_follows_the_fp32_update(policy):
    clipped = POLICY_LOSSES.resolve({"name": "clipped"}, where="loss")
    start = {n: p.detach().clone() for n, p in policy.model.named_parameters()}
    fp32, bf16 = policy, copy.deepcopy(policy)
    bf16.autocast_dtype = torch.bfloat16
    batch = fixed_batch(fp32)  # the same old log-probs (float32) for both
    sgd_update(learner_for(fp32, clipped, lr=0.1), batch, step=0, kl_coef=0.0)
    learner = learner_for(bf16, clipped, lr=0.1)
    sgd_update(learner, copy.deepcopy(batch), step=0, kl_coef=0.0)
    d32 = torch.cat([(p.detach() - start[n]).flatten() for n, p in fp32.model.named_parameters()])
    d16 = torch.cat([(p.detach() - start[n]).flatten() for n, p in bf16.model.named_parameters()])
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in bf16.model.parameters())
    assert not torch.equal(d16, d32)  # the forward really ran in bf16
    cosine = torch.nn.functional.cosine_similarity(d16, d32, dim=0).item()
    assert cosine > 0.99, cosine
    assert (d16.norm() / d32.norm()).item() == pytest.approx(1.0, abs=0.05)


def test_bf16_sampling_draws_valid_completions_with_float32_log_probs(policy):
    policy.autocast_dtype = torch.bfloat16
    ids, pmask, _, _ = _inputs(policy)
    torch.manual_seed(1)
    tokens, mask, logp = policy.generate(ids, pmask, Sampling(temperature=1.0))
    assert logp.dtype == torch.float32 and torch.isfinite(logp).all()
    assert ((logp <= 0) | (mask == 0)).all() and (logp * mask).sum() < 0
    assert tokens.min() >= 0 and tokens.max() < policy.vocab_size


def test_reference_dtype_bf16_stores_the_reference_in_bf16_and_leaves_the_policy_alone(policy):
    ref = policy.frozen_copy(torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in ref.model.parameters())
    assert all(p.dtype == torch.float32 and p.requires_grad for p in policy.model.parameters())
    ref_bytes = sum(p.numel() * p.element_size() for p in ref.model.parameters())
    policy_bytes = sum(p.numel() * p.element_size() for p in policy.model.parameters())
    assert ref_bytes * 2 == policy_bytes
    with torch.no_grad():
        gap = (ref.score(*_inputs(policy)).logp - policy.score(*_inputs(policy)).logp).abs().max().item()
    assert 0 < gap < 0.1, gap


@pytest.mark.parametrize("key", ["precision", "reference_dtype"])
def test_an_unknown_precision_is_refused_in_one_line(key):
    with pytest.raises(RlxError, match=rf"trainer.{key} must be fp32 or bf16, got 'fp16'"):
        plan(compose_cfg([f"trainer.{key}=fp16"]))


@pytest.mark.parametrize("algo", ["grpo", "dpo"])
def test_a_bf16_run_with_a_bf16_reference_trains_and_saves_float32_weights(algo, tmp_path):
    from safetensors.torch import load_file

    from rlx.train import train
    from tests.conftest import TINY

    extra = ["kl=k3", "kl.coef=0.05"]
    if algo == "dpo":
        data = tmp_path / "data"
        write_sort_data(data, train=16, heldout=8, task_eval_size=16, candidates=2)
        extra = ["algo.batch_size=8", "algo.epochs=1", f"data.train={data / 'pairs_train.jsonl'}"]
    cfg = compose_cfg(
        [
            *TINY,
            f"algo={algo}",
            *extra,
            "logger=none",
            "trainer.precision=bf16",
            "trainer.reference_dtype=bf16",
        ]
    )
    summary = train(cfg, run_dir=tmp_path / "run")
    assert summary["steps"] == 2
    weights = load_file(str(tmp_path / "run" / "final" / "model.safetensors"))
    assert weights and all(w.dtype == torch.float32 for w in weights.values())


@pytest.mark.parametrize("micro_batch_size", [None, 3])
def test_under_bf16_the_old_log_probs_make_the_first_ratio_one(tmp_path, micro_batch_size):
    """A bf16 decode step and the update's bf16 full-sequence forward round differently, so under bf16
    the old log-probs are the policy's scoring forward's (as for an external engine): ratio 1 at the
    tolerance of tests/test_models.py's fp32 test, and in fact exactly."""
    from rlx.loops import chunks
    from rlx.train import build
    from tests.conftest import TINY

    mbs = f"trainer.micro_batch_size={micro_batch_size or 'null'}"
    cfg = compose_cfg([*TINY, mbs, "trainer.precision=bf16", "logger=none"])
    session = build(cfg, tmp_path)
    trainer, learner = session.trainer, session.trainer.learner
    ro = trainer.collect().rollout
    rows = torch.arange(len(ro.tokens))
    with torch.no_grad():  # the update's first epoch, micro-batch by micro-batch
        for idx in chunks(rows, learner.micro_batch_size):
            scores, _ = learner.forward(ro, idx, entropy=True)
            ratio = torch.exp(scores.logp - ro.old_logp[idx]) * ro.mask[idx]
            assert torch.allclose(ratio, ro.mask[idx], atol=1e-5)
            assert torch.equal(scores.logp * ro.mask[idx], ro.old_logp[idx])
        # what the recompute is for: the bf16 decode's own log-probs are further off than 1e-5
        sampled = trainer.policy.generate(ro.prompt_ids, ro.prompt_mask, trainer.sampling)
        fresh = trainer.policy.score(ro.prompt_ids, ro.prompt_mask, sampled[0], sampled[1]).logp * sampled[1]
        assert (fresh - sampled[2]).abs().max().item() > 1e-5
    session.tracker.close()
