"""Models: sampling-time log-probs equal training-time ones, and checkpoints load with Auto*."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlx.models import (
    Sampling,
    build_tiny_gpt,
    build_tiny_policy,
    build_toy_sort,
    load_pretrained,
    token_logp,
)
from rlx.models.policy import completion_mask
from rlx.rollout import sample_groups
from rlx.tasks.sort import SortTask

TASK = SortTask(length=4, vocab=10, eval_size=20)


def builders():
    return {
        "toy_sort": lambda: build_toy_sort(TASK),
        "tiny_policy": lambda: build_tiny_policy(TASK),
        "tiny_gpt": lambda: build_tiny_gpt(TASK, n_layer=1, n_embd=32, n_head=2),
    }


@pytest.mark.parametrize("name", ["toy_sort", "tiny_policy", "tiny_gpt"])
@pytest.mark.parametrize("sampling", [Sampling(), Sampling(temperature=0.7, top_k=5, top_p=0.9)])
def test_old_logp_recorded_at_sampling_equals_a_fresh_forward(name, sampling):
    torch.manual_seed(0)
    policy = builders()[name]()
    ro = sample_groups(policy, TASK.train_batch(0, 6), 3, sampling)
    assert ro.tokens.shape == (18, 4) and ro.mask.shape == (18, 4)
    with torch.no_grad():
        logits = policy.completion_logits(ro.prompt_ids, ro.prompt_mask, ro.tokens, ro.mask)
    fresh = token_logp(logits, ro.tokens, sampling.temperature) * ro.mask
    assert torch.allclose(fresh, ro.old_logp, atol=1e-5)
    assert (ro.old_logp[ro.mask == 0] == 0).all()


def test_left_padded_prompts_score_like_unpadded_ones():
    torch.manual_seed(0)
    policy = build_tiny_gpt(TASK, n_layer=1, n_embd=32, n_head=2)
    ids, mask = policy.encode([[1, 2, 3, 4], [5, 6]])  # the second prompt is left-padded
    assert mask[1].tolist() == [0, 0, 1, 1, 1, 1]
    tokens, comp_mask, gen = policy.generate(ids, mask, Sampling())  # log-probs recorded as drawn
    alone_ids, alone_mask = policy.encode([[5, 6]])
    with torch.no_grad():
        alone = policy.completion_logits(alone_ids, alone_mask, tokens[1:], comp_mask[1:])
    assert torch.allclose(token_logp(alone, tokens[1:]) * comp_mask[1:], gen[1:], atol=1e-5)


def test_top_k_filters_what_is_sampled_and_model_generation_config_is_ignored():
    torch.manual_seed(0)
    policy = build_tiny_gpt(TASK, n_layer=1, n_embd=32, n_head=2)
    policy.model.generation_config.top_k = 1  # a model's own generation_config.json must not apply
    policy.model.generation_config.do_sample = False
    ids, mask = policy.encode([[1, 2, 3, 4]] * 400)
    tokens, _, _ = policy.generate(ids, mask, Sampling())
    assert tokens[:, 0].unique().numel() > 5
    tokens, _, _ = policy.generate(ids, mask, Sampling(top_k=2))
    with torch.no_grad():  # the first step's logits: generate keeps none (issue 12)
        first = policy.model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, -1]
    top2 = first.topk(2).indices
    assert set(tokens[:, 0].unique().tolist()) <= set(top2.tolist())


def test_completion_mask_covers_tokens_through_the_first_eos():
    tokens = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 0, 0, 0]])
    assert completion_mask(tokens, eos_id=2).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert completion_mask(tokens, eos_id=None).tolist() == [[1.0] * 4] * 3


def test_sampled_rows_that_hit_eos_are_masked_after_it():
    torch.manual_seed(0)
    policy = build_tiny_gpt(TASK, n_layer=1, n_embd=32, n_head=2)
    eos = policy.eos_id
    ro = sample_groups(policy, TASK.train_batch(0, 64), 1, Sampling(temperature=5.0))
    stopped = 0
    for row, m in zip(ro.tokens.tolist(), ro.mask.tolist()):
        if eos in row[:-1]:
            k = row.index(eos)
            stopped += 1
            assert m[: k + 1] == [1.0] * (k + 1) and all(x == 0 for x in m[k + 1 :])
    assert stopped > 0
    assert ro.completions[0] == policy.task.parse_completion(
        [policy.tokenizer.decode([t]) for t, keep in zip(ro.tokens[0].tolist(), ro.mask[0].tolist()) if keep]
    )


def test_toy_sort_decodes_positions_independently():
    torch.manual_seed(0)
    policy = build_toy_sort(TASK)
    prompt = torch.tensor([[1, 2, 3, 4]] * 2)
    a = policy.completion_logits(
        prompt, torch.ones_like(prompt), torch.tensor([[0, 0, 0, 0], [9, 9, 9, 9]]), torch.ones(2, 4)
    )
    assert torch.allclose(a[0], a[1])  # earlier response tokens do not matter


@pytest.mark.parametrize("name", ["toy_sort", "tiny_policy", "tiny_gpt"])
def test_checkpoint_is_a_save_pretrained_directory(name, tmp_path):
    torch.manual_seed(0)
    policy = builders()[name]()
    policy.save(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    ids = tok(["3 1 0 2"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.allclose(model(input_ids=ids).logits, policy.model(input_ids=ids).logits)
    again = load_pretrained(tmp_path, TASK, name)
    assert type(again.model) is type(policy.model)
    if name == "tiny_gpt":
        assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"
        assert tok.convert_ids_to_tokens(ids[0].tolist()) == ["<bos>", "3", "1", "0", "2", "<sep>"]
