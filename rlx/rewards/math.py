"""``reward=math``: 1 if the completion's final answer equals the dataset's answer, else 0.

Answers are parsed and compared by HuggingFace's math-verify (``pip install 'rlx[math]'``), the
checker of open-r1 and TRL's ``accuracy_reward``: LaTeX and plain numbers, ``\\boxed{}``, fractions,
decimals, thousands separators and equivalent forms (``1/2`` = ``0.5`` = ``\\frac{2}{4}``). rlx adds
only what datasets need around it: GSM8K's reference answers end in ``#### 42`` (the text after
the last ``####`` is the answer, as verl's gsm8k scorer reads it), a bare reference ("x^2") is read
as LaTeX, tags such as ``<answer>`` are replaced by spaces before parsing (math-verify does not read
a number glued to a tag), and ``extract`` picks where a completion's answer is read from.

math-verify bounds each parse with ``signal.alarm`` (SIGALRM), which only the main thread may use.
It saves and restores its own SIGALRM handler and never touches SIGINT/SIGTERM, so it coexists
with the handlers rlx installs during training; off the main thread rlx parses without a timeout.
"""

from __future__ import annotations

import re
import threading
from functools import lru_cache
from typing import Any

from rlx.errors import RlxError
from rlx.rewards import REWARDS

EXTRACT_MODES = ("any", "boxed", "answer_tag", "gsm8k")
_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K = "####"


def _math_verify() -> Any:
    try:
        import math_verify
    except ImportError as exc:  # an optional extra
        raise RlxError("reward=math needs math-verify: pip install 'rlx[math]' (or math-verify)") from exc
    return math_verify


def _timeout(seconds: int) -> int | None:
    # signal.alarm works only in the main thread; elsewhere math-verify refuses a timeout
    return seconds if threading.current_thread() is threading.main_thread() else None


def _configs(mode: str) -> list[Any]:
    mv = _math_verify()
    if mode == "boxed":  # LaTeX answers with an anchor only: \boxed{...}, "the final answer is $...$"
        return [mv.LatexExtractionConfig(boxed_match_priority=0, try_extract_without_anchor=False)]
    return [mv.LatexExtractionConfig(), mv.ExprExtractionConfig()]  # math-verify's defaults


def _answer_region(text: str, mode: str) -> str | None:
    """The part of a completion its answer is read from; None when the mode finds none."""
    if mode == "answer_tag":
        found = _ANSWER_TAG.findall(text)
        return found[-1] if found else None
    if mode == "gsm8k":
        return text.rsplit(_GSM8K, 1)[1] if _GSM8K in text else None
    return text


_TAG = re.compile(r"</?[A-Za-z_][\w-]*>")


@lru_cache(maxsize=65536)
def _parse_gold(gold: str, timeout: int) -> tuple[Any, ...]:
    """A reference answer: GSM8K's text after ``####``, a solution with ``\\boxed{}`` or ``$...$``
    (MATH), or a bare answer ("42", "x^2", "3\\pi", read as LaTeX)."""
    mv = _math_verify()
    if _GSM8K in gold:
        text = gold.rsplit(_GSM8K, 1)[1].strip().replace(",", "")
    elif "\\boxed" in gold or "$" in gold:
        text = gold
    else:
        text = f"${gold.strip()}$"
    return tuple(mv.parse(text, _configs("any"), parsing_timeout=_timeout(timeout)))


def answer_is_correct(completion: str, gold: Any, *, extract: str = "any", timeout: int = 5) -> bool:
    """Whether math-verify finds the completion's final answer equal to the reference ``gold``."""
    mv = _math_verify()
    if gold is None:
        return False
    parsed_gold = _parse_gold(str(gold), timeout)
    if not parsed_gold:
        raise RlxError(f"reward=math: cannot read an answer from the reference {str(gold)[-200:]!r}")
    region = _answer_region(str(completion), extract)
    if region is None:
        return False
    # math-verify does not read a number glued to a tag ("<answer>43</answer>"): tags become spaces
    region = _TAG.sub(" ", region)
    answer = mv.parse(region, _configs(extract), parsing_timeout=_timeout(timeout))
    if not answer:
        return False
    return bool(mv.verify(list(parsed_gold), answer, timeout_seconds=_timeout(timeout)))


def check_math(kwargs: dict[str, Any]) -> None:
    """Start-up check of the settings (the column is checked against the task by `check_math_column`)."""
    _math_verify()
    if kwargs.get("extract", "any") not in EXTRACT_MODES:
        raise RlxError(f"reward.extract={kwargs.get('extract')!r}; one of {', '.join(EXTRACT_MODES)}")
    if int(kwargs.get("timeout", 5)) < 0:
        raise RlxError(f"reward.timeout must be >= 0 seconds, got {kwargs.get('timeout')}")


def check_math_column(kwargs: dict[str, Any], columns: list[str], where: str) -> None:
    """The ground-truth column must be one the task provides."""
    column = kwargs.get("column", "answer")
    if column not in columns:
        raise RlxError(
            f"{where}=math verifies against column {column!r}, which the data does not have (columns: "
            f"{', '.join(c for c in columns if c not in ('prompt_text', 'completion_text'))}); set "
            f"{where}.column=<the column with the reference answer>"
        )


@REWARDS.register(
    "math", check=check_math, check_task=check_math_column, verifier=True, max_reward=lambda prompt: 1.0
)
def math_answer_reward(
    prompts: list[Any],
    completions: list[Any],
    *,
    column: str = "answer",
    extract: str = "any",
    timeout: int = 5,
    **columns: Any,
) -> list[float]:
    """1.0 if the completion's final answer is mathematically equal to the reference in ``column``,
    else 0.0 (the accuracy reward of DeepSeek-R1, Guo et al. 2025, and of TRL's ``accuracy_reward``).

    ``extract``: ``any`` (math-verify's default: ``\\boxed{}`` first, then LaTeX or plain answers,
    the last one), ``boxed`` (only ``\\boxed{}`` or an explicit "final answer is"), ``answer_tag``
    (inside the last ``<answer>...</answer>``, the R1 template), ``gsm8k`` (after the last ``####``).
    Where rlx departs from TRL: a reference that cannot be parsed stops the run with its value
    (TRL skips the row with reward None); a completion with no answer scores 0.
    """
    if column not in columns:
        raise RlxError(f"reward=math: no column {column!r} among {sorted(columns)}")
    texts = columns.get("completion_text") or completions
    return [
        1.0 if answer_is_correct(str(text), gold, extract=extract, timeout=timeout) else 0.0
        for text, gold in zip(texts, columns[column])
    ]
