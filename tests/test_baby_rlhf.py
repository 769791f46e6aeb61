"""experiment=baby_rlhf: seed 001's setting (tokens task, token_match reward, tiny policy, PPO)."""

from __future__ import annotations

import json

import pytest

from rlx.errors import RlxError
from rlx.rewards import REWARDS
from rlx.tasks.tokens import TokensTask
from rlx.train import train
from tests.conftest import compose_cfg


def test_token_match_is_per_token_and_normalised():
    fn = REWARDS.resolve({"name": "token_match"}, where="reward")
    assert fn([[0], [0]], [[1, 1, 3, 1], [2, 2]]) == [[0.25, 0.25, 0.0, 0.25], [0.0, 0.0]]
    raw = REWARDS.resolve({"name": "token_match", "target": 2, "normalize": False}, where="reward")
    assert raw([[0]], [[1, 2, 2]]) == [[0.0, 1.0, 1.0]]


def test_tokens_task():
    task = TokensTask(vocab=10, length=8)
    assert task.train_batch(3, 4).prompts == [[0]] * 4 and task.eval_batch().prompts == [[0]]
    assert task.max_new_tokens == 8
    assert task.is_correct([0], [1] * 8) and not task.is_correct([0], [1] * 7 + [2])
    with pytest.raises(RlxError, match="must be a token"):
        TokensTask(vocab=3, target=5)


def test_baby_rlhf_samples_from_the_policy_and_learns(tmp_path):
    cfg = compose_cfg(["experiment=baby_rlhf", "trainer.steps=12", "trainer.eval_every=0", "logger=none"])
    assert cfg.model.name == "tiny_policy" and cfg.algo.name == "ppo" and cfg.reward.name == "token_match"
    train(cfg, run_dir=tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "reward/mean" in r]
    # the untrained policy samples token 1 about one time in ten; 12 PPO iterations raise that a lot
    assert train_rows[0]["reward/mean"] < 0.4
    assert train_rows[-1]["reward/mean"] > train_rows[0]["reward/mean"] + 0.3
    samples = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len({tuple(s["completion"]) for s in samples if s["step"] == 1}) > 1  # really sampled
