"""Rows that share a prompt read it once (issue 12): the update's and the reference's teacher-forced
pass (`shared_prompt_forward`) and the sampling loop's prefill. Same numbers and same gradients as
the one pass over every row; fewer tokens through the model; models that cannot share keep the old
path."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel, Qwen2ForCausalLM

import rlx.models.policy
from rlx.models import Policy, Sampling, build_tiny_gpt
from rlx.models.logprobs import (
    completion_forward,
    linear_head,
    prompt_groups,
    shares_prompts,
)
from rlx.models.tokenizer import build_number_tokenizer
from rlx.tasks.sort import SortTask
from tests.conftest import tiny_qwen2

TASK = SortTask(length=4, vocab=10, eval_size=20)


def qwen2(vocab: int = 300, **extra) -> Qwen2ForCausalLM:
    return tiny_qwen2(vocab, layers=2, **extra)


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return build_tiny_gpt(TASK, n_layer=2, n_embd=32, n_head=2).model


def batch(vocab: int, layout: str, g: int = 3, p: int = 5, t: int = 4):
    """Four distinct prompts (two left-padded by different amounts) x ``g`` rows each, in the grouped
    layout of `sample_groups` or shuffled; random completions, one ending early."""
    torch.manual_seed(1)
    ids = torch.randint(3, vocab, (4, p))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    mask[2, :1] = 0
    ids[mask == 0] = 0
    ids, mask = ids.repeat_interleave(g, 0), mask.repeat_interleave(g, 0)
    if layout == "shuffled":
        perm = torch.randperm(len(ids))
        ids, mask = ids[perm], mask[perm]
    comp = torch.randint(3, vocab, (len(ids), t))
    comp_mask = torch.ones(len(ids), t)
    comp_mask[0, 2:] = 0
    return ids, mask, comp, comp_mask


def test_prompt_groups_finds_the_distinct_prompts_in_either_layout():
    ids, mask, _, _ = batch(50, "grouped")
    grouped = prompt_groups(ids, mask)
    assert grouped is not None and grouped.repeats == 3
    assert grouped.first.tolist() == [0, 3, 6, 9]
    assert grouped.inverse.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    ids, mask, _, _ = batch(50, "shuffled")
    shuffled = prompt_groups(ids, mask)
    assert shuffled is not None and shuffled.repeats is None and len(shuffled.first) == 4
    assert torch.equal(ids[shuffled.first][shuffled.inverse], ids)  # every row maps to its own prompt
    assert torch.equal(mask[shuffled.first][shuffled.inverse], mask)
    assert shuffled.first.tolist() == sorted(shuffled.first.tolist())  # in order of first appearance
    assert prompt_groups(ids[shuffled.first], mask[shuffled.first]) is None  # nothing repeats
    # the same ids under a different mask are a different prompt (the pad id can be a real token)
    same_ids = torch.tensor([[0, 5, 6], [0, 5, 6]])
    assert prompt_groups(same_ids, torch.tensor([[0, 1, 1], [1, 1, 1]])) is None


@pytest.mark.parametrize("t", [4, 1])  # one completion token: the prompt's last position only
@pytest.mark.parametrize("layout", ["grouped", "shuffled"])
@pytest.mark.parametrize("arch", ["gpt2", "qwen2"])
def test_shared_prompt_forward_equals_the_pass_over_every_row_with_gradients(arch, layout, t):
    """Logits and last hidden states at the completion's positions, and the gradient of every
    parameter, against ``share_prompts=False``, on left-padded prompts (float64, so a wrong position,
    mask or expansion shows far above rounding; the gradients differ at 1e-15 for GPT-2 and 1e-7 for
    Qwen2, whose RMSNorm computes in float32 and so rounds the prompt's summed gradient)."""
    model = (gpt2() if arch == "gpt2" else qwen2()).double()
    assert shares_prompts(model)
    ids, mask, comp, comp_mask = batch(model.config.vocab_size, layout, t=t)
    results = []
    for share in (True, False):
        model.zero_grad()
        logits, hidden = completion_forward(
            model, ids, mask, comp, comp_mask, hidden=True, share_prompts=share
        )
        assert logits is not None and hidden is not None
        assert logits.shape[:2] == hidden.shape[:2] == comp.shape
        w = torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)
        ((logits * w).sum(-1) * comp_mask).sum().backward(retain_graph=True)
        (hidden.square().sum(-1) * comp_mask).sum().backward()
        results.append((logits.detach(), hidden.detach(), [p.grad.clone() for p in model.parameters()]))
    (l1, h1, g1), (l2, h2, g2) = results
    assert torch.allclose(l1, l2, atol=1e-10) and torch.allclose(h1, h2, atol=1e-10)
    # Qwen2's RMSNorm runs in float32 even here: agreement to its rounding, relative to the whole gradient
    # (k_proj's bias has a gradient of exactly 0 in exact arithmetic: softmax ignores a per-query shift)
    a, b = torch.cat([g.flatten() for g in g1]), torch.cat([g.flatten() for g in g2])
    assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def count_tokens(model: torch.nn.Module) -> list[int]:
    """Records the number of input tokens of every forward of ``model``."""
    seen: list[int] = []
    model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].numel()), with_kwargs=True
    )
    return seen


def test_policy_score_reads_each_prompt_once():
    """The update's pass (`Policy.score`, the fused head): 4 prompts of 5 tokens once, then 12
    completions of 4 against their cache, and the same log-probs as every row at once."""
    policy = Policy(qwen2(), build_number_tokenizer(10), TASK, "qwen2")
    ids, mask, comp, comp_mask = batch(300, "grouped")
    assert linear_head(policy.model) is not None  # its one-time check (a 3-token forward) done first
    seen = count_tokens(policy.model)
    scores = policy.score(ids, mask, comp, comp_mask, 0.7, entropy=True)
    assert seen == [4 * 5, 12 * 4]
    with torch.no_grad():
        logits, _ = completion_forward(policy.model, ids, mask, comp, comp_mask, share_prompts=False)
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, comp[..., None])[..., 0] * comp_mask
    assert torch.allclose(scores.logp, ref, atol=1e-5)


def test_sampling_prefills_each_prompt_once_and_draws_what_the_full_prefill_draws(monkeypatch):
    """`Policy.generate`'s prefill: 4 distinct prompts, not 12 rows; the same tokens and log-probs as
    prefilling every row (the same seed, so the same uniforms) to float rounding."""
    policy = Policy(qwen2(), build_number_tokenizer(10), TASK, "qwen2")
    ids, mask, _, _ = batch(300, "grouped")
    sampling = Sampling(temperature=0.9, max_new_tokens=6)
    assert rlx.models.policy.decode_head(policy.model) is not None  # its one-time checks run before counting
    seen = count_tokens(policy.model)
    torch.manual_seed(5)
    tokens, comp_mask, logp = policy.generate(ids, mask, sampling)
    assert seen[0] == 4 * 5 and seen[1:] == [12] * (len(seen) - 1)
    monkeypatch.setattr(rlx.models.policy, "shares_prompts", lambda model: False)
    torch.manual_seed(5)
    tokens2, comp_mask2, logp2 = policy.generate(ids, mask, sampling)
    assert seen[len(seen) - tokens2.shape[1]] == 12 * 5  # the whole prefill this time
    assert torch.equal(tokens, tokens2) and torch.equal(comp_mask, comp_mask2)
    assert torch.allclose(logp, logp2, atol=1e-5)


def test_models_that_cannot_share_keep_the_pass_over_every_row():
    """Sliding-window attention (its cache drops old keys) and gradient checkpointing in training
    (which turns the cache off) are not shared; they still score every row correctly."""
    sliding = qwen2(use_sliding_window=True, sliding_window=4, max_window_layers=0)
    assert not shares_prompts(sliding)
    ids, mask, comp, comp_mask = batch(300, "grouped")
    seen = count_tokens(sliding)
    completion_forward(sliding, ids, mask, comp, comp_mask)
    assert seen == [12 * 9]
    model = qwen2()
    model.gradient_checkpointing_enable()
    model.train()
    assert not shares_prompts(model)
    model.eval()
    assert shares_prompts(model)  # no checkpointing outside training: the cache is on


def test_a_lora_model_is_scored_through_its_base_models_keywords():
    """peft's ``PeftModelForCausalLM.forward`` takes ``**kwargs`` and hands them to the model it wraps:
    a LoRA policy gets the head over the completion's positions only (no logits of the prompt's) and a
    group's prompt read once, like the bare model."""
    from peft import LoraConfig, get_peft_model

    from tests.test_speed import LargestTensor

    model = get_peft_model(qwen2(vocab=20000), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    policy = Policy(model, build_number_tokenizer(10), TASK, "qwen2")
    ids, mask, comp, comp_mask = batch(20000, "grouped")
    assert linear_head(policy.model) is not None
    seen = count_tokens(model.get_base_model())
    biggest = LargestTensor()
    with biggest:
        scores = policy.score(ids, mask, comp, comp_mask, 1.0)
        scores.logp.sum().backward()
    assert seen == [4 * 5, 12 * 4]
    assert biggest.numel < 12 * 4 * 20000  # not even the completions' logits: the fused head
    with torch.no_grad():
        logits, _ = completion_forward(policy.model, ids, mask, comp, comp_mask, share_prompts=False)
    ref = torch.log_softmax(logits, -1).gather(-1, comp[..., None])[..., 0] * comp_mask
    assert torch.allclose(scores.logp, ref, atol=1e-5)
