"""Benchmarks for :mod:`enigma_lightning.evaluate`: loading (through ``datasets``), questions and answer scoring.

A benchmark yields :class:`Item` s: the question text the prompt carries (for multiple choice, the question then the
lettered choices and an instruction to answer with the letter), and the gold answer (a number or string for open
questions, a letter for multiple choice). Choices are shuffled with a seed per item, so the gold letter is spread
evenly and the order is the same on every run.

- ``bundled``: the bundled arithmetic eval split (200 questions, none in the training file); open answers.
- ``gpqa``: ``Idavidrein/gpqa`` (``gpqa_diamond``, gated: accept its terms on the hub and log in), 4 choices.
- ``truthfulqa_mc``: ``truthfulqa/truthful_qa`` (``multiple_choice``, ``mc1_targets``: one true answer).

Every benchmark's ``path`` also takes a local json/jsonl/parquet/csv file with the hub dataset's columns.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any

from ..errors import EnigmaError
from ..rewards import answers_match, extract_answer, is_strict

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_INSTRUCTION = "Answer with the letter of the correct choice."
KINDS = ("bundled", "gpqa", "truthfulqa_mc")


@dataclass
class Item:
    id: str
    question: str  # as the prompt carries it
    answer: str  # gold: the target, or the letter of the correct choice
    choices: list[str] = field(default_factory=list)  # multiple choice only, in the order shown


@dataclass
class Benchmark:
    """One benchmark (``conf/benchmark/<name>.yaml``)."""

    name: str
    kind: str  # bundled | gpqa | truthfulqa_mc: how rows become items
    path: str  # hub id, local file, or bundled_eval
    subset: str | None = None  # the hub dataset's config name
    split: str = "train"
    revision: str | None = None
    limit: int | None = None  # first N items after the seeded shuffle; null: all
    seed: int = 0

    def load(self) -> list[Item]:
        from .datasets import load_rows

        if self.kind not in KINDS:
            raise EnigmaError(f"benchmark.{self.name}.kind must be one of {list(KINDS)}; got {self.kind!r}")
        try:
            rows = load_rows(self.path, split=self.split, name=self.subset, revision=self.revision,
                             key=f"benchmark.{self.name}.path")
        except EnigmaError:
            raise
        except Exception as e:  # no hub, gated dataset, wrong id
            raise EnigmaError(
                f"benchmark.{self.name}: could not load {self.path!r} (subset {self.subset}, split {self.split}): "
                f"{type(e).__name__}: {str(e).splitlines()[0][:300]}. On a machine without the hub, point "
                f"benchmark.{self.name}.path at a local copy (json/jsonl/parquet/csv with the same columns), or leave "
                f"{self.name} out of benchmark=[...]") from e
        items = [self._item(i, r) for i, r in enumerate(rows)]
        random.Random(self.seed).shuffle(items)
        return items[: self.limit] if self.limit else items

    def _item(self, i: int, row: dict[str, Any]) -> Item:
        try:
            if self.kind == "bundled":
                return Item(str(i), row["source"], str(row["target"]))
            if self.kind == "gpqa":
                right = row["Correct Answer"]
                wrong = [row[f"Incorrect Answer {k}"] for k in (1, 2, 3)]
                return self._mc(str(row.get("Record ID", i)), row["Question"], right, wrong, i)
            targets = row["mc1_targets"]
            labels, choices = targets["labels"], targets["choices"]
            right = choices[labels.index(1)]
            return self._mc(str(i), row["question"], right, [c for c, lab in zip(choices, labels, strict=True)
                                                             if lab != 1], i)
        except (KeyError, ValueError, TypeError) as e:
            raise EnigmaError(f"benchmark.{self.name}: row {i} of {self.path!r} lacks what kind={self.kind} reads "
                              f"({type(e).__name__}: {e}); its columns are {sorted(row)}") from e

    def _mc(self, item_id: str, question: str, right: str, wrong: list[str], i: int) -> Item:
        choices = [str(right).strip(), *(str(w).strip() for w in wrong)]
        random.Random(f"{self.seed}-{i}").shuffle(choices)
        gold = LETTERS[choices.index(str(right).strip())]
        lines = [str(question).strip(), ""] + [f"{LETTERS[k]}. {c}" for k, c in enumerate(choices)]
        return Item(item_id, "\n".join([*lines, "", MC_INSTRUCTION]), gold, choices)


_LETTER = re.compile(r"^\(?([A-Z])\)?(?:[.):]|\s|$)")


def choice_letter(answer: str | None, choices: list[str]) -> str | None:
    """The letter a multiple-choice answer names: ``B``, ``(B)``, ``B.``, ``B) text``, or a choice's exact text."""
    if answer is None:
        return None
    a = answer.strip()
    norm = a.rstrip(".").strip().lower()
    for k, c in enumerate(choices):  # a choice's text first: "A bird" may be a choice, not letter A
        if norm == c.rstrip(".").strip().lower():
            return LETTERS[k]
    m = _LETTER.match(a)
    if m and LETTERS.index(m.group(1)) < len(choices):
        return m.group(1)
    m = re.fullmatch(r"(?:the )?(?:answer|option|choice)(?: is)?:?\s*\(?([A-Z])\)?\.?", a, re.IGNORECASE)
    return m.group(1).upper() if m and LETTERS.index(m.group(1).upper()) < len(choices) else None


def score(item: Item, completion: str) -> dict[str, Any]:
    """Format compliance, the extracted answer and correctness. ``correct`` needs the strict format (as
    ``val/accuracy`` during training); ``correct_lenient`` reads the last ``<answer>`` block whatever surrounds it."""
    strict = is_strict(completion)
    extracted = extract_answer(completion)
    if item.choices:
        predicted = choice_letter(extracted, item.choices)
        right = predicted == item.answer
    else:
        predicted = extracted
        right = answers_match(extracted, item.answer)
    return {"strict": strict, "extracted": extracted, "predicted": predicted, "correct": bool(strict and right),
            "correct_lenient": bool(right)}
