"""The sort rewards on the lecture's own examples, process rewards, and reward validation."""

from __future__ import annotations

import pytest
import torch

from rlx.errors import RlxError
from rlx.registry import Resolved
from rlx.rewards import REWARDS, score_completions

PROMPT = [3, 1, 0, 2]
GT = [0, 1, 2, 3]
RESPONSES = [[0, 1, 2, 3], [7, 2, 2, 5], [0, 3, 1, 2]]


def call(name: str, completions, prompts=None, **kw):
    prompts = prompts or [PROMPT] * len(completions)
    fn = REWARDS.resolve({"name": name, **kw}, where="reward")
    return fn(prompts, completions, ground_truth=[sorted(p) for p in prompts])


def test_sort_distance_reward_matches_the_lecture():
    # lecture: 4 for the sorted answer, 1 and 1 for the two wrong ones
    assert call("sort", RESPONSES) == [4.0, 1.0, 1.0]
    assert call("sort", RESPONSES, normalize=True) == [1.0, 0.25, 0.25]


def test_sort_inclusion_reward_matches_the_lecture():
    # lecture: 7 (= 4 + 3) for the sorted answer, 3 and 6 for the wrong ones
    fn = REWARDS.get("sort_inclusion").fn
    assert fn([PROMPT] * 3, RESPONSES) == [7.0, 3.0, 6.0]


def test_sort_inclusion_loophole_is_kept():
    fn = REWARDS.get("sort_inclusion").fn
    assert fn([[1, 1, 2]], [[1, 2, 2]]) == [5.0]  # not a permutation, still the maximum 2n - 1


def test_sort_exact_and_tokens():
    assert call("sort_exact", RESPONSES) == [1.0, 0.0, 0.0]
    assert call("sort_tokens", RESPONSES) == [[1, 1, 1, 1], [0, 0, 1, 0], [1, 0, 0, 0]]


def test_short_or_junk_completions_earn_less():
    # None = a token that spells no number (EOS, specials); a short answer has fewer tokens
    assert call("sort", [[0, 1, None, 3], [0, 1]]) == [3.0, 2.0]
    assert call("sort_exact", [[0, 1, 2]]) == [0.0]
    assert call("sort_tokens", [[0, None]]) == [[1.0, 0.0]]


def _mask(lengths: list[int], t: int = 4) -> torch.Tensor:
    return torch.tensor([[1.0] * n + [0.0] * (t - n) for n in lengths])


def test_score_completions_places_process_rewards_on_real_tokens():
    reward = REWARDS.resolve("sort_tokens", where="reward")
    out = score_completions(
        reward, [PROMPT, PROMPT], [[0, 1], [0, 9, 9, 9]], {"ground_truth": [GT, GT]}, _mask([2, 4])
    )
    assert out.tolist() == [[1, 1, 0, 0], [1, 0, 0, 0]]


def _custom(fn) -> Resolved:
    from rlx.registry import Entry

    return Resolved(Entry("mine", fn), {}, {})


def test_reward_returning_nan_names_the_prompt_and_completion():
    def nan_reward(prompts, completions):
        return [float("nan") if c == [9] else 1.0 for c in completions]

    with pytest.raises(RlxError, match=r"nan for prompt \[2\], completion \[9\]"):
        score_completions(_custom(nan_reward), [[1], [2]], [[1], [9]], {}, _mask([1, 1], 1))


def test_reward_of_the_wrong_length():
    with pytest.raises(RlxError, match="returned 1 scores for 2 completions"):
        score_completions(_custom(lambda p, c: [1.0]), [[1], [2]], [[1], [2]], {}, _mask([1, 1], 1))
    with pytest.raises(RlxError, match="3 scores for a completion of 1 tokens"):
        score_completions(_custom(lambda p, c: [[1, 1, 1]] * 2), [[1], [2]], [[1], [2]], {}, _mask([1, 1], 1))


def test_reward_that_raises_shows_the_offending_row():
    def picky(prompts, completions):
        return [1.0 / (c[0] - 5) for c in completions]

    with pytest.raises(RlxError, match=r"ZeroDivisionError.*prompt \[2\], completion \[5\]"):
        score_completions(_custom(picky), [[1], [2]], [[1], [5]], {}, _mask([1, 1], 1))
