"""Data: the bundled files, loading through `datasets`, bad rows, and step-indexed batches."""

import json

import pytest
from helpers import data_module

from enigma_lightning.data import bundled
from enigma_lightning.data.datasets import (
    StepBatchSampler,
    bundled_path,
    check_rows,
    load_rows,
)
from enigma_lightning.errors import DataError
from enigma_lightning.rewards import answers_match


def test_bundled_files_match_generator():
    for split in ("train", "eval"):
        rows = [json.loads(line) for line in open(bundled_path(split))]
        assert rows == bundled.generate(split)
        assert len(rows) == bundled.SIZES[split]
    train = {r["source"] for r in bundled.generate("train")}
    assert not train & {r["source"] for r in bundled.generate("eval")}  # eval is held out


def test_bundled_answers_are_checkable():
    for row in bundled.generate("train"):
        assert set(row) == {"source", "rationale", "target", "task", "type"}
        assert row["rationale"].rstrip(". abcdefghijklmnopqrstuvwxyz").endswith(row["target"])
        assert answers_match(row["target"], row["target"])


def test_local_files_through_datasets(tmp_path):
    rows = [{"source": f"q{i}", "rationale": "r", "target": str(i), "task": "t", "type": "x"} for i in range(5)]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows))
    assert load_rows(str(jsonl)) == rows
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert load_rows(str(tmp_path / "d.parquet")) == rows
    folder = tmp_path / "hub_like"  # a local folder stands in for a hub dataset id
    folder.mkdir()
    (folder / "train.jsonl").write_text(jsonl.read_text())
    assert load_rows(str(folder)) == rows


def test_missing_file_names_the_key(tmp_path):
    with pytest.raises(DataError, match="data.path: file .*nope.jsonl does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_bad_rows_are_reported_with_index():
    rows = [{"source": "q", "target": "1"}, {"source": "", "target": "2"}, {"target": "3"}, {"source": "q", "target": None}]
    with pytest.raises(DataError) as e:
        check_rows(rows, "data.path='x.jsonl'")
    msg = str(e.value)
    assert "3 bad row(s) in data.path='x.jsonl'" in msg
    assert "row 1: empty 'source'" in msg and "row 2: missing field 'source'" in msg and "row 3: missing field 'target'" in msg
    assert "data.on_bad_rows=skip" in msg
    good, problems = check_rows(rows, "x", on_bad_rows="skip")
    assert good == rows[:1] and len(problems) == 3


def test_datamodule_split_limit_and_columns(tmp_path):
    rows = [{"question": f"q{i}", "answer": str(i)} for i in range(40)]
    path = tmp_path / "other_schema.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    dm = data_module(path=str(path), columns={"source": "question", "target": "answer"}, val_size=8, limit=20,
                       batch_size=8, num_generations=4)
    dm.setup()
    assert len(dm.val_rows) == 8 and len(dm.train_rows) == 20
    assert not {r["source"] for r in dm.val_rows} & {r["source"] for r in dm.train_rows}
    batch = next(iter(dm.train_dataloader()))
    assert len(batch["source"]) == 2  # 8 completions / G=4


def test_step_sampler_is_a_function_of_step():
    s = StepBatchSampler(10, 3, seed=1)
    it = iter(s)
    first = [next(it) for _ in range(7)]
    resumed = iter(StepBatchSampler(10, 3, seed=1, start_step=4))
    assert [next(resumed) for _ in range(3)] == first[4:]
    assert all(len(set(b)) == 3 for b in first)
    assert sorted(sum(first[:3], [])) == sorted(set(sum(first[:3], [])))  # no repeats within an epoch
