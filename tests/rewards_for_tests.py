"""Custom rewards used by the tests through ``reward=custom reward.fn=tests.rewards_for_tests:...``."""

from __future__ import annotations


def huge(prompts, completions):
    """Finite but so large that -A * logp overflows float32: the loss becomes inf."""
    return [3.0e38 for _ in completions]


def huge_if_first_is_zero(prompts, completions):
    """Overflows the loss only for batches where some completion starts with 0."""
    return [3.0e38 if c and c[0] == 0 else 0.0 for c in completions]


def length(prompts, completions, ground_truth):
    """Counts the completion's tokens that spell a number; uses a task column by name."""
    assert len(ground_truth) == len(prompts)
    return [float(sum(t is not None for t in c)) for c in completions]


def text_digits(prompts, completions, prompt_text, completion_text):
    """Reads the text columns: the number of digits in the decoded completion."""
    assert all(isinstance(t, str) for t in prompt_text + completion_text)
    assert prompt_text[0] == " ".join(map(str, prompts[0]))
    return [float(sum(ch.isdigit() for ch in t)) for t in completion_text]


def text_length(prompts, completions):
    """Text tasks: the number of characters of each completion (capped), for a few online steps."""
    return [float(min(len(c), 20)) for c in completions]


def strings(prompts, completions):
    """Not a number: a reward that returns text."""
    return ["good" for _ in completions]


def huge_on_rank_1(prompts, completions):
    """`huge` on torchrun's rank 1 only (a non-finite loss on one rank), 0 elsewhere."""
    import os

    value = 3.0e38 if os.environ.get("RANK") == "1" else 0.0
    return [value for _ in completions]


def raises_on_rank_1(prompts, completions):
    """A bug on torchrun's rank 1 only (an exception that no other rank sees), 0 elsewhere."""
    import os

    if os.environ.get("RANK") == "1":
        raise ValueError("a reward bug on rank 1")
    return [0.0 for _ in completions]


def prompt_mean_plus_length(prompts, completions):
    """Varies from prompt to prompt even when an untrained model's greedy completions are alike: the
    prompt's mean number over 7 (a fraction, so the order of a sum shows) plus the completion's length."""
    return [sum(p) / (7.0 * len(p)) + len(c) for p, c in zip(prompts, completions)]


def even_first_only(prompts, completions):
    """DAPO's dynamic sampling under torchrun (h11g): a prompt whose first number is odd gives its whole
    group 0 (an uninformative group, dropped and resampled); an even one the completion's numbers' sum
    over 10 plus its length, which varies within a group."""
    return [
        sum(t or 0 for t in c) / 10.0 + len(c) if p[0] % 2 == 0 else 0.0 for p, c in zip(prompts, completions)
    ]
