"""One list of metric names: docs/metrics.md is generated from it, every column a run writes is in it, the
summary/report/dashboard read names through it, and train returns the metric it optimises."""

import csv
import math
from pathlib import Path

import pytest

from enigma_lightning.metrics.names import documented, metric, render_doc

ROOT = Path(__file__).resolve().parents[1]


def test_docs_table_is_generated_from_the_list():
    text = (ROOT / "docs" / "metrics.md").read_text()
    assert render_doc(text) == text, "run: python -m enigma_lightning.metrics.names"


def test_names_match_placeholders_and_unknown_names_are_refused():
    assert documented("train/reward/format/mean") and documented("perf/sami_prepare_time")
    assert documented("train/ot/divergence/layer_3") and not documented("train/ot/divergence/layer_3/x")
    with pytest.raises(KeyError, match="not in enigma_lightning.metrics.names.TABLE"):
        metric("train/grpo/made_up")


def test_every_logged_column_is_documented_and_train_returns_the_optimised_metric(make_cfg, tmp_path):
    from enigma_lightning.commands.train import task

    out = tmp_path / "run"
    value = task(make_cfg("experiment=smoke", "loss=full", "optimized_metric=train/reward/mean", out=out))
    with open(out / "metrics.csv") as f:
        header = next(csv.reader(f))
    undocumented = [c for c in header if c not in ("step", "epoch") and not documented(c)]
    assert undocumented == []
    assert isinstance(value, float) and math.isfinite(value)


def test_optimized_metric_must_be_a_logged_name(make_cfg):
    from enigma_lightning.runtime.validate import config_problems

    assert config_problems(make_cfg("optimized_metric=val/acc")) == [
        "optimized_metric=val/acc is not a metric a run logs (docs/metrics.md). Set optimized_metric="
        "val/accuracy_best, or optimized_metric=null"]


def test_the_table_keeps_its_header_after_a_paragraph():
    """A paragraph right before the table's marker: the table still renders with its header (a blank line
    separates them), in Python-Markdown as on GitHub."""
    markdown = pytest.importorskip("markdown")
    from enigma_lightning.metrics.names import BEGIN, END

    text = f"# Metrics\n\nA paragraph, then at once the table:\n{BEGIN}\nold\n{END}\nA paragraph after it.\n"
    out = render_doc(text)
    # blank lines around it: no renderer can take the header for part of the marker's HTML block or a paragraph
    assert f"{BEGIN}\n\n| name | meaning |\n" in out and f"|\n\n{END}" in out
    html = markdown.markdown(out, extensions=["tables"])
    assert html.count("<thead>") == 1 and "<td><code>train/loss</code></td>" in html
    assert "A paragraph after it.</p>" in html
    doc = markdown.markdown((ROOT / "docs" / "metrics.md").read_text(), extensions=["tables"])
    assert doc.count("<thead>") == 2  # our table and the TRL name mapping
