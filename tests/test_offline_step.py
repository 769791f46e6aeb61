"""The offline loop's stages as functions: fitting rows to the model's context, and one optimizer
step on a hand-built batch (fixed rows in, parameters and metrics out), no run around them."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from rlx.data import Example
from rlx.data.encode import Encoded, encode_rows, fit_to_context
from rlx.loops import NonFiniteGuard
from rlx.loops.offline_feeds import FEEDS, CompletionsFeed, PairsFeed, offline_step
from rlx.losses.preference import INPUTS, PREFERENCE_LOSSES
from rlx.models import build_tiny_gpt, context_length
from rlx.tasks.sort import SortTask

# ids: <pad>=0 <bos>=1 <eos>=2 <sep>=3, numbers 0..9 = 4..13 (rlx.models.tokenizer)
PROMPTS = [[1, 7, 5, 4, 6, 3], [1, 9, 8, 3]]
COMPLETIONS = [[4, 5, 6, 7, 2], [8, 9, 2]]


def tiny_policy(seed: int = 0):
    torch.manual_seed(seed)
    return build_tiny_gpt(SortTask(eval_size=4), n_layer=1, n_embd=32, n_head=2)


def nll_by_hand(model: torch.nn.Module) -> torch.Tensor:
    """The mean NLL of the completion tokens, one unpadded row at a time."""
    total, count = torch.zeros(()), 0
    for p, c in zip(PROMPTS, COMPLETIONS):
        ids = torch.tensor([p + c])
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
        total = total - sum(logp[len(p) + j - 1, tok] for j, tok in enumerate(c))
        count += len(c)
    return total / count


@pytest.mark.parametrize("micro_batch_size", [None, 1])
def test_one_sft_step_is_the_clipped_gradient_step_by_hand(micro_batch_size, fused_head_calls):
    """On the fused head with the NLL's gradient formed in its forward (`FusedLoss`; the NLL is
    token-local), checked against autograd through the model's own logits."""
    policy = tiny_policy()
    by_hand = copy.deepcopy(policy.model)
    loss = PREFERENCE_LOSSES.resolve({"name": "sft_nll"}, where="algo.loss")
    feed = CompletionsFeed(policy, loss, max_len=64)
    data = Encoded(prompts=PROMPTS, first=COMPLETIONS)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    metrics = offline_step(
        feed,
        data,
        [0, 1],
        optimizer=optimizer,
        scheduler=None,
        grad_clip=0.5,
        guard=NonFiniteGuard("stop"),
        step=0,
        micro_batch_size=micro_batch_size,
    )
    # the same step by hand: the NLL over the 8 completion tokens, its gradient, clipped to norm 0.5
    expected = nll_by_hand(by_hand)
    expected.backward()
    grads = [p.grad for p in by_hand.parameters()]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    assert metrics["loss/total"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["loss/sft"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-4)
    assert metrics["lr"] == 0.1 and metrics["nonfinite/skipped"] == 0.0
    assert norm.item() > 0.5  # so the clip is exercised
    scale = 0.5 / norm.item()
    for (name, new), old in zip(policy.model.named_parameters(), by_hand.parameters()):
        assert torch.allclose(new, old - 0.1 * scale * old.grad, atol=1e-6), name
    assert not policy.model.training  # back in eval mode after the step
    assert len(fused_head_calls) == (2 if micro_batch_size == 1 else 1)


def test_one_packed_sft_step_is_the_gradient_step_by_hand(fused_head_calls):
    """Packed rows (`pack_rows`: both examples in one row, positions restarting) through the fused head
    with the NLL's gradient formed in its forward, against autograd through the model's own logits of
    the packed row."""
    from rlx.data.encode import pack_rows

    policy = tiny_policy()
    by_hand = copy.deepcopy(policy.model)
    loss = PREFERENCE_LOSSES.resolve({"name": "sft_nll"}, where="algo.loss")
    feed = CompletionsFeed(policy, loss, max_len=64)
    packed = pack_rows(Encoded(prompts=PROMPTS, first=COMPLETIONS), 64)
    assert len(packed) == 1
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    common = dict(scheduler=None, grad_clip=None, guard=NonFiniteGuard("stop"), step=0, micro_batch_size=None)
    metrics = offline_step(feed, packed, [0], optimizer=optimizer, **common)
    ids, labels, pos = (torch.tensor([x]) for x in packed[0])
    logp = torch.log_softmax(by_hand(input_ids=ids, position_ids=pos).logits[0, :-1].float(), -1)
    chosen = logp.gather(-1, ids[0, 1:, None])[:, 0]
    expected = -(chosen * labels[0, 1:]).sum() / labels[0, 1:].sum()
    expected.backward()
    assert metrics["loss/sft"] == pytest.approx(expected.item(), rel=1e-5)
    for (name, new), old in zip(policy.model.named_parameters(), by_hand.parameters()):
        assert torch.allclose(new, old - 0.1 * old.grad, atol=1e-6), name
    assert fused_head_calls == [1]


def test_a_dpo_step_starts_at_log2_and_moves_the_policy_not_the_reference():
    policy = tiny_policy()
    loss = PREFERENCE_LOSSES.resolve({"name": "dpo", "beta": 0.1}, where="algo.loss")
    feed = FEEDS[loss.entry.meta["inputs"]](policy, loss, max_len=64)
    assert isinstance(feed, PairsFeed) and feed.ref is not None
    rejected = [[4, 4, 4, 4, 2], [9, 8, 2]]
    data = Encoded(prompts=PROMPTS, first=COMPLETIONS, second=rejected)
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    guard = NonFiniteGuard("stop")
    common = dict(optimizer=optimizer, scheduler=None, grad_clip=None, guard=guard, micro_batch_size=None)
    first = offline_step(feed, data, [0, 1], step=0, **common)
    # pi_ref is the starting policy: z = 0, L = log 2, every implicit reward 0
    assert first["loss/total"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["rewards/margin"] == pytest.approx(0.0, abs=1e-6)
    assert first["rewards/chosen"] == pytest.approx(0.0, abs=1e-6)
    after = policy.model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for k, v in feed.ref.model.state_dict().items():
        assert torch.equal(v, before[k]), k
    second = offline_step(feed, data, [0, 1], step=1, **common)
    assert second["loss/total"] < math.log(2) and second["rewards/margin"] > 0  # one step learned


def test_a_nonfinite_loss_is_skipped_without_touching_the_weights():
    policy = tiny_policy()
    loss = PREFERENCE_LOSSES.resolve({"name": "sft_nll"}, where="algo.loss")
    feed = CompletionsFeed(policy, loss, max_len=64)
    with torch.no_grad():
        policy.model.lm_head.weight[5, 0] = float("nan")  # every logit row gets a NaN
    before = {k: v.clone() for k, v in policy.model.state_dict().items()}
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.1)
    guard = NonFiniteGuard("skip", 3)
    metrics = offline_step(
        feed,
        Encoded(prompts=PROMPTS, first=COMPLETIONS),
        [0, 1],
        optimizer=optimizer,
        scheduler=None,
        grad_clip=1.0,
        guard=guard,
        step=0,
        micro_batch_size=None,
    )
    assert metrics == {"nonfinite/skipped": 1.0}
    for k, v in policy.model.state_dict().items():
        assert torch.allclose(v, before[k], rtol=0, atol=0, equal_nan=True), k
    assert all(p.grad is None for p in policy.parameters())  # the update's gradients were dropped


def test_every_declared_input_has_a_feed():
    assert set(FEEDS) == set(INPUTS)
    for name in PREFERENCE_LOSSES.names():
        assert PREFERENCE_LOSSES.get(name).meta["inputs"] in FEEDS, name


def test_fit_to_context_cuts_the_completion_first_then_the_prompt():
    p, c = list(range(6)), list(range(100, 171))  # 6 + 71 tokens in a 64-token context
    fp, (fc,) = fit_to_context(p, [c], 64)
    assert fp == p and fc == c[:58]  # the completion keeps its first tokens
    long_p = list(range(100))
    fp, (fc,) = fit_to_context(long_p, [c[:10]], 64)
    assert fp == long_p[-54:] and fc == c[:10]  # the prompt keeps its last tokens
    fp, (a, b) = fit_to_context(long_p, [c, c[:3]], 64)
    assert fp == long_p[-32:] and a == c[:32] and b == c[:3]  # half each when both are long
    same = fit_to_context(p, [c[:5]], 64)
    assert same[0] is p  # rows that fit are untouched


def test_encode_rows_counts_what_the_context_cut():
    policy = tiny_policy()
    assert context_length(policy.model) == 64
    long = " ".join(["1"] * 70)
    rows = [
        Example(prompt="3 1 0 2", chosen=long, rejected="0 1 2 3"),
        Example(prompt="1 2", chosen="1", rejected="2"),
    ]
    enc = encode_rows(
        policy, rows, "pairs", max_prompt_len=512, max_completion_len=512, append_eos=True, context=64
    )
    assert enc.cut_to_context == 1
    assert enc.counts["data/truncated_completions"] == 1 and enc.counts["data/truncated_prompts"] == 0
    assert len(enc.prompts[0]) + len(enc.first[0]) == 64 and len(enc.second[0]) == 5
    assert enc.first[1] == [5, 2] and enc.second[1] == [6, 2]  # short rows as they were


def test_offline_settings_are_the_yaml_keys_and_hold_no_defaults():
    # settings written once: conf/loop/offline.yaml holds every default, the dataclasses the types
    import dataclasses

    import yaml

    from rlx.data import DataSettings
    from rlx.loops.offline import OfflineAlgoSettings
    from tests.conftest import REPO

    conf = yaml.safe_load((REPO / "conf" / "loop" / "offline.yaml").read_text())
    algo = {f.name for f in dataclasses.fields(OfflineAlgoSettings)}
    assert algo - {"name", "loss"} == set(conf["algo"])  # name and loss come from the preset
    assert {f.name for f in dataclasses.fields(DataSettings)} == set(conf["data"])
    for cls in (OfflineAlgoSettings, DataSettings):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, f.name
