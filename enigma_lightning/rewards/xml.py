"""Format-gated rewards for XML chain-of-thought completions.

Every reward function has TRL's signature ``f(prompts, completions, **columns) -> list[float | None]``, where
``completions`` are decoded strings (the assistant prefill included) and ``columns`` are the dataset's fields
(``target``, ``task``, ...), one value per completion. ``None`` means "not applicable"; a completion for which every
function returns ``None`` gets no advantage (as in TRL).

The strict format is the whole completion ``<reasoning>...</reasoning>`` then ``<answer>...</answer>``, nothing
before or after, each tag exactly once. A single-match regex can be gamed by repeated blocks or trailing text, so
the strict check is a full match *and* tag counts. Partial credit (tags present once, in order) gives GRPO a
gradient on the way to the strict match; a completion with repeated blocks or trailing text scores below a clean
one.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")
STRICT = re.compile(r"\s*<reasoning>\n?(?P<reasoning>.+?)\n?</reasoning>\s*<answer>\n?(?P<answer>.+?)\n?</answer>\s*",
                    re.DOTALL)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")

RewardFn = Callable[..., list]


def is_strict(completion: str) -> bool:
    """Whole-completion match and each tag exactly once."""
    return all(completion.count(t) == 1 for t in TAGS) and STRICT.fullmatch(completion) is not None


def format_score(completion: str, tag_credit: float = 0.125, order_credit: float = 0.25) -> float:
    """1.0 for the strict format; else ``tag_credit`` per tag present exactly once, plus ``order_credit`` when all
    four are present once and in order (max 0.75 without the strict match)."""
    if is_strict(completion):
        return 1.0
    counts = [completion.count(t) for t in TAGS]
    score = tag_credit * sum(c == 1 for c in counts)
    if all(c == 1 for c in counts):
        positions = [completion.index(t) for t in TAGS]
        if positions == sorted(positions):
            score += order_credit
    return score


def extract_answer(completion: str) -> str | None:
    """The text inside the last ``<answer>...</answer>``, stripped; None if there is none."""
    found = re.findall(r"<answer>(.*?)</answer>", completion, re.DOTALL)
    return found[-1].strip() if found else None


def answers_match(predicted: str | None, target: str) -> bool:
    """Numeric comparison when the target is a number (first number in the prediction), else case-insensitive
    exact match after stripping whitespace and a trailing period."""
    if predicted is None:
        return False
    t = str(target).strip()
    try:
        tv = float(t.replace(",", ""))
    except ValueError:
        return predicted.strip().rstrip(".").lower() == t.rstrip(".").lower()
    m = _NUMBER.search(predicted)
    return m is not None and math.isclose(float(m.group().replace(",", "")), tv, rel_tol=0, abs_tol=1e-6)


def xml_format_reward(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    """Strict XML format reward with partial credit (see :func:`format_score`)."""
    return [format_score(c) for c in completions]


def strict_format_reward(prompts: Sequence, completions: Sequence[str], **columns) -> list[float]:
    """1.0 for the strict XML format, else 0.0 (no partial credit)."""
    return [float(is_strict(c)) for c in completions]


def gated_correctness_reward(prompts: Sequence, completions: Sequence[str], target: Sequence[str] | None = None,
                             **columns) -> list[float | None]:
    """1.0 when the format is strict *and* the answer matches ``target``; 0.0 otherwise (gated by format).
    ``None`` for rows without a target."""
    if target is None:
        return [None] * len(completions)
    out: list[float | None] = []
    for c, t in zip(completions, target, strict=True):
        if t is None:
            out.append(None)
        else:
            out.append(float(is_strict(c) and answers_match(extract_answer(c), t)))
    return out
