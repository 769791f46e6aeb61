"""The reward-model layout shared by algo=rm (training) and reward=model (scoring)."""

from __future__ import annotations

import pytest
import torch

from rlx.errors import RlxError
from rlx.models import build_tiny_gpt
from rlx.models.reward_model import (
    build_tiny_reward_model,
    encode_for_reward,
    last_real_index,
    load_reward_model,
    reward_scores,
)
from rlx.models.tokenizer import build_number_tokenizer
from rlx.tasks.sort import SortTask


def test_encoding_is_prompt_template_then_completion_then_eos():
    tok = build_number_tokenizer(10)
    ids, mask = encode_for_reward(tok, ["3 1", "2"], ["1 3", "2"])
    assert tok.convert_ids_to_tokens(ids[0].tolist()) == ["<bos>", "3", "1", "<sep>", "1", "3", "<eos>"]
    assert mask[1].tolist() == [1, 1, 1, 1, 1, 0, 0]


def test_last_real_index_ignores_padding_side():
    assert last_real_index(torch.tensor([[1, 1, 0], [0, 1, 1], [1, 1, 1]])).tolist() == [1, 2, 2]


def test_score_is_read_at_the_last_real_token_whatever_the_padding(tmp_path):
    torch.manual_seed(0)
    tok = build_number_tokenizer(10)
    rm = build_tiny_reward_model(tok, n_layer=1, n_embd=32, n_head=2).eval()
    right_ids, right_mask = encode_for_reward(tok, ["3 1 0 2", "5"], ["0 1 2 3", "5"])
    # the same rows left-padded, and with the pad token itself inside the second completion's padding
    n = right_mask.sum(-1)
    left_ids = torch.full_like(right_ids, tok.pad_token_id)
    left_mask = torch.zeros_like(right_mask)
    for i in range(2):
        left_ids[i, -n[i] :] = right_ids[i, : n[i]]
        left_mask[i, -n[i] :] = 1
    with torch.no_grad():
        a = reward_scores(rm, right_ids, right_mask)
        b = reward_scores(rm, left_ids, left_mask)
    assert torch.allclose(a, b, atol=1e-5)
    rm.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, _ = load_reward_model(tmp_path)
    with torch.no_grad():
        assert torch.allclose(reward_scores(loaded, right_ids, right_mask), a, atol=1e-6)


def test_a_policy_directory_is_not_a_reward_model(tmp_path):
    build_tiny_gpt(SortTask(eval_size=4), n_layer=1, n_embd=32, n_head=2).save(tmp_path)
    with pytest.raises(RlxError, match="is not a reward model"):
        load_reward_model(tmp_path)
    with pytest.raises(RlxError, match="does not exist"):
        load_reward_model(tmp_path / "missing")
