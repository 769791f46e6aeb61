"""reward=model: a tiny reward model built here, saved to disk, scoring an online run's completions."""

from __future__ import annotations

import json

import pytest
import torch

from rlx.errors import RlxError
from rlx.models import build_tiny_gpt
from rlx.models.reward_model import build_tiny_reward_model, encode_for_reward, reward_scores
from rlx.models.tokenizer import build_number_tokenizer
from rlx.rewards import REWARDS
from rlx.tasks.sort import SortTask
from rlx.train import plan, train
from tests.conftest import TINY, compose_cfg, rlx_refused


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    torch.manual_seed(0)
    tok = build_number_tokenizer(10)
    build_tiny_reward_model(tok, n_layer=1, n_embd=32, n_head=2).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_scores_equal_the_reward_model_read_directly(reward_model_dir):
    fn = REWARDS.resolve({"name": "model", "path": str(reward_model_dir), "batch_size": 2}, where="reward")
    prompts, comps = ["3 1 0 2", "5 4", "1"], ["0 1 2 3", "4 5", "1"]
    got = fn([None] * 3, [None] * 3, prompt_text=prompts, completion_text=comps)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(reward_model_dir).eval()
    ids, mask = encode_for_reward(build_number_tokenizer(10), prompts, comps)
    with torch.no_grad():
        want = reward_scores(model, ids, mask)
    assert got == pytest.approx(want.tolist(), abs=1e-5)
    assert len(set(got)) == 3  # a real model: different inputs, different scores


def test_online_run_trains_on_reward_model_scores(reward_model_dir, tmp_path):
    cfg = compose_cfg([*TINY, "reward=model", f"reward.path={reward_model_dir}", "logger=none"])
    train(cfg, run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert rows[0]["reward/std"] > 0  # the scores vary with the completion
    assert len({s["reward"] for s in samples}) > 1


def test_bad_reward_model_directories_fail_at_plan_time(tmp_path):
    with pytest.raises(RlxError, match="does not exist"):
        plan(compose_cfg([*TINY, "reward=model", f"reward.path={tmp_path / 'missing'}"]))
    build_tiny_gpt(SortTask(eval_size=4), n_layer=1, n_embd=32, n_head=2).save(tmp_path / "policy")
    with pytest.raises(RlxError, match="is not a reward model"):
        plan(compose_cfg([*TINY, "reward=model", f"reward.path={tmp_path / 'policy'}"]))
    with pytest.raises(RlxError, match=r"needs reward\.path"):
        plan(compose_cfg([*TINY, "reward=model"]))


def test_cli_reports_a_missing_reward_model_in_one_line(tmp_path):
    proc = rlx_refused("train", "reward=model", f"reward.path={tmp_path / 'nope'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"rlx: error: reward model directory {tmp_path / 'nope'} does not exist"
    ]
