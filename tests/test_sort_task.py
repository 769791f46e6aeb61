"""The sort task: a seeded, resumable, rank-shardable stream and a disjoint held-out set."""

from __future__ import annotations

import pytest

from rlx.errors import RlxError
from rlx.tasks.sort import SortTask


def test_eval_set_is_fixed_distinct_and_disjoint_from_training():
    task = SortTask(length=3, vocab=6, eval_size=50, seed=7)
    held_out = {tuple(p) for p in task.eval_batch().prompts}
    assert len(held_out) == 50
    assert held_out == {
        tuple(p) for p in SortTask(length=3, vocab=6, eval_size=50, seed=7).eval_batch().prompts
    }
    seen = set()
    for step in range(200):
        seen |= {tuple(p) for p in task.train_batch(step, 16).prompts}
    assert not seen & held_out
    assert len(seen) > 100  # the stream does explore the rest of the space


def test_stream_is_a_function_of_seed_and_step():
    a, b = SortTask(seed=1), SortTask(seed=1)
    assert a.train_batch(5, 8).prompts == b.train_batch(5, 8).prompts
    assert a.train_batch(5, 8).prompts != a.train_batch(6, 8).prompts
    assert a.train_batch(5, 8).prompts != SortTask(seed=2).train_batch(5, 8).prompts
    assert a.train_batch(5, 8, stream=1).prompts != a.train_batch(5, 8).prompts


def test_ranks_shard_one_global_batch():
    task = SortTask()
    whole = task.train_batch(3, 8, rank=0, world_size=1).prompts
    assert len(whole) == 8
    global_ = (
        SortTask().train_batch(3, 4, rank=0, world_size=2).prompts
        + SortTask().train_batch(3, 4, rank=1, world_size=2).prompts
    )
    assert global_ == whole


def test_ground_truth_and_parsing():
    task = SortTask(length=3, vocab=10)
    batch = task.train_batch(0, 4)
    assert batch.columns["ground_truth"] == [sorted(p) for p in batch.prompts]
    assert task.parse_completion(["3", " 7", "<eos>", "12"]) == [3, 7, None, None]
    assert task.is_correct([2, 1], [1, 2]) and not task.is_correct([2, 1], [2, 1])


def test_fixed_prompts_cycle_and_are_their_own_eval_set():
    task = SortTask(prompts=[[1, 0, 2], [3, 2, 4], [1, 2, 3]], vocab=5)
    assert task.length == 3 and task.vocab == 5
    assert task.train_batch(0, 3).prompts == [[1, 0, 2], [3, 2, 4], [1, 2, 3]]
    assert task.eval_batch().prompts == [[1, 0, 2], [3, 2, 4], [1, 2, 3]]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"length": 0}, "task.length must be at least 1"),
        ({"vocab": 1}, "task.vocab must be at least 2"),
        ({"length": 2, "vocab": 4, "eval_size": 9}, "half of the 16 possible prompts"),
        ({"prompts": [[1, 2], [3]]}, "equal-length"),
    ],
)
def test_impossible_settings(kwargs, message):
    with pytest.raises(RlxError, match=message):
        SortTask(**kwargs)
