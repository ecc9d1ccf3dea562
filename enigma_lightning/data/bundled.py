"""The bundled offline dataset: arithmetic and word problems in the CoT-Collection schema.

Every row has ``source`` (the question), ``rationale`` (a worked chain of thought), ``target`` (the integer
answer as text), ``task`` and ``type``, like ``kaist-ai/CoT-Collection``. The files in ``assets/`` are generated
deterministically by ``python -m enigma_lightning.bundled``; a test checks that they match this generator. The
``eval`` split shares no question with ``train`` (it is the held-out benchmark).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jamal", "Kira", "Liam"]
ITEMS = ["apples", "books", "coins", "marbles", "pencils", "stickers", "cookies", "stamps", "shells", "cards"]
SIZES = {"train": 640, "eval": 200}
SEEDS = {"train": 20251013, "eval": 1013}


def _row(source: str, rationale: str, answer: int, task: str) -> dict:
    return {"source": source, "rationale": rationale, "target": str(answer), "task": task, "type": "bundled_arithmetic"}


def _problem(rng: random.Random) -> dict:
    kind = rng.choice(["add", "sub", "mul", "word_add", "word_sub", "word_groups", "word_two_step"])
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if kind == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return _row(f"What is {a} + {b}?", f"Adding {a} and {b}: {a} + {b} = {a + b}.", a + b, kind)
    if kind == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        return _row(f"What is {a} - {b}?", f"Subtracting {b} from {a}: {a} - {b} = {a - b}.", a - b, kind)
    if kind == "mul":
        a, b = rng.randint(2, 12), rng.randint(2, 9)
        return _row(f"What is {a} times {b}?", f"{a} times {b} is {a} x {b} = {a * b}.", a * b, kind)
    if kind == "word_add":
        a, b = rng.randint(2, 30), rng.randint(2, 20)
        return _row(
            f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?",
            f"{name} starts with {a} {item}. Getting {b} more gives {a} + {b} = {a + b}.",
            a + b,
            kind,
        )
    if kind == "word_sub":
        a = rng.randint(8, 40)
        b = rng.randint(1, a - 1)
        return _row(
            f"{name} has {a} {item} and gives away {b}. How many {item} are left?",
            f"{name} starts with {a} {item} and gives away {b}, so {a} - {b} = {a - b} are left.",
            a - b,
            kind,
        )
    if kind == "word_groups":
        a, b = rng.randint(2, 9), rng.randint(2, 8)
        return _row(
            f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?",
            f"There are {a} boxes of {b} {item}, so {a} x {b} = {a * b} {item}.",
            a * b,
            kind,
        )
    a, b = rng.randint(2, 6), rng.randint(2, 6)
    c = rng.randint(1, a * b - 1)
    return _row(
        f"{name} buys {a} packs of {item} with {b} in each pack, then gives {c} to a friend. "
        f"How many {item} does {name} keep?",
        f"{a} packs of {b} make {a} x {b} = {a * b} {item}. After giving away {c}: {a * b} - {c} = {a * b - c}.",
        a * b - c,
        kind,
    )


def generate(split: str) -> list[dict]:
    """Deterministic rows of one split; ``eval`` excludes every ``train`` question."""
    exclude = {r["source"] for r in generate("train")} if split == "eval" else set()
    rng = random.Random(SEEDS[split])
    rows: list[dict] = []
    seen = set(exclude)
    while len(rows) < SIZES[split]:
        row = _problem(rng)
        if row["source"] not in seen:
            seen.add(row["source"])
            rows.append(row)
    return rows


def write(out_dir: Path) -> None:
    for split in SIZES:
        with open(out_dir / f"arithmetic_{split}.jsonl", "w") as f:
            for row in generate(split):
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    write(Path(__file__).parent / "assets")
