"""Checks of a local data file before ``datasets`` reads it, and of its columns after: each message names the key
(``data.path`` / ``data.val_path``), the file, the line or column, and the fix."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import DataError

# names other datasets give our fields, for the data.columns suggestion
ALIASES = {"source": ("question", "prompt", "input", "problem", "instruction", "query"),
           "target": ("answer", "output", "solution", "label", "response", "completion")}


def local_files(p: Path, key: str, suffixes: dict[str, str]) -> list[Path]:
    if not p.exists():
        raise DataError(f"{key}: file {p} does not exist. Point {key} at a json/jsonl/parquet/csv file.")
    files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.suffix in suffixes)
    if not files:
        raise DataError(f"{key}: no json/jsonl/parquet/csv files in folder {p}.")
    if files[0].suffix not in suffixes:
        raise DataError(f"{key}: {p} has suffix {p.suffix!r}; use one of {sorted(suffixes)}.")
    return files


def check_file(f: Path, key: str) -> None:
    """Empty files, header-only CSVs and malformed JSON lines (1-based line numbers)."""
    if f.suffix == ".parquet":
        return
    text = f.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise DataError(f"{key}: {f} is empty. Add rows (source and target fields), or point {key} at another file")
    if f.suffix == ".csv":
        rows = list(csv.reader(text.splitlines()))
        if len([r for r in rows if any(c.strip() for c in r)]) < 2:
            raise DataError(f"{key}: {f} has a header ({', '.join(rows[0])}) but no rows. Add rows below the header")
        return
    if f.suffix == ".json":
        try:
            json.loads(text)
            return
        except json.JSONDecodeError:
            pass  # maybe JSON lines in a .json file: checked line by line below
    bad = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as e:
            bad.append(f"line {n}: not valid JSON ({e.msg} at column {e.colno})")
            continue
        if not isinstance(value, dict):
            bad.append(f"line {n}: a JSON {type(value).__name__}, not an object with source and target")
    if bad:
        shown = "\n  ".join(bad[:10]) + (f"\n  ... and {len(bad) - 10} more" if len(bad) > 10 else "")
        raise DataError(f"{key}: {f} has {len(bad)} malformed line(s):\n  {shown}\n"
                        "Each line must be one JSON object, e.g. {\"source\": \"2 + 2?\", \"target\": \"4\"}. "
                        "Fix or remove these lines")


def column_problem(rows: list[dict], columns: dict[str, str], where: str, required: tuple[str, ...],
                   schema: tuple[str, ...]) -> str | None:
    """A message when ``data.columns`` names a column the data lacks, or no row has a required field."""
    found = sorted({k for r in rows for k, v in r.items() if v is not None})
    for ours, theirs in (columns or {}).items():
        if ours not in schema:
            return f"data.columns.{ours}: not a field we read (fields: {', '.join(schema)}). Remove it"
        if rows and theirs not in found:
            return (f"data.columns.{ours}={theirs}: {where} has no column {theirs!r} (its columns: "
                    f"{', '.join(found)}). Set data.columns.{ours}=<one of them>")
    mapped = {ours for ours in (columns or {})}
    absent = [k for k in required if k not in mapped and rows and not any(r.get(k) is not None for r in rows)]
    if not absent:
        return None
    guess = {k: next((c for c in found if c.lower() in ALIASES.get(k, ())), None) for k in absent}
    fix = ",".join(f"{k}:{guess[k] or '<column>'}" for k in absent)
    return (f"{where} has no {' or '.join(repr(k) for k in absent)} column; its columns are {', '.join(found)}. "
            f"Map yours to ours: data.columns={{{fix}}}")
