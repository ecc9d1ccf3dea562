"""Evaluation and probe commands end to end on a tiny trained run; answer extraction and multiple-choice scoring."""

import json

import pytest
import torch

from enigma_lightning.data.evalsets import Benchmark, Item, choice_letter, score
from enigma_lightning.data.prompts import format_completion
from enigma_lightning.errors import EnigmaError

# on a random tiny model the format reward is constant; a length reward gives GRPO a signal, so the policy moves
SIGNAL = ["+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
          "allowed_targets=[helpers]"]
CHOICES = ["Paris", "London", "A bird", "Rome"]


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("(B)", "B"), ("B.", "B"), ("B) London", "B"), ("london", "B"), ("Rome.", "D"),
    ("A bird", "C"), ("The answer is D", "D"), ("answer: (a)", "A"), ("E", None), ("", None), (None, None),
    ("Berlin", None),
])
def test_choice_letter(answer, letter):
    assert choice_letter(answer, CHOICES) == letter


def test_score_open_and_multiple_choice():
    mc = Item("1", "q", "B", CHOICES)
    assert score(mc, format_completion("It is London.", "B")) | {"extracted": None} == {
        "strict": True, "extracted": None, "predicted": "B", "correct": True, "correct_lenient": True}
    loose = score(mc, "<reasoning>x</reasoning> <answer>B</answer> and more text")
    assert not loose["strict"] and not loose["correct"] and loose["correct_lenient"]
    assert not score(mc, format_completion("r", "A"))["correct_lenient"]
    op = Item("2", "What is 6 x 7?", "42")
    assert score(op, format_completion("6 x 7 = 42", "42"))["correct"]
    assert score(op, format_completion("6 x 7 = 42", "The answer is 42."))["correct"]
    assert not score(op, format_completion("r", "41"))["correct_lenient"]
    assert score(op, "no tags at all")["predicted"] is None


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return str(path)


def test_multiple_choice_benchmarks_load_through_datasets_from_local_files(tmp_path):
    tqa = _write(tmp_path / "tqa.jsonl", [
        {"question": f"Q{i}?", "mc1_targets": {"choices": [f"true{i}", "f1", "f2"], "labels": [1, 0, 0]}}
        for i in range(12)])
    items = Benchmark("truthfulqa_mc", "truthfulqa_mc", tqa, seed=3).load()
    assert len(items) == 12
    for it in items:
        assert it.choices[ord(it.answer) - 65].startswith("true") and "A. " in it.question
        assert it.question.endswith("Answer with the letter of the correct choice.")
    assert len({it.answer for it in items}) > 1  # the true answer is not always first
    assert [it.question for it in Benchmark("t", "truthfulqa_mc", tqa, seed=3).load()] == [it.question for it in items]

    gpqa = _write(tmp_path / "gpqa.jsonl", [
        {"Question": "Which?", "Correct Answer": "right", "Incorrect Answer 1": "w1", "Incorrect Answer 2": "w2",
         "Incorrect Answer 3": "w3", "Record ID": "rec0"}])
    (it,) = Benchmark("gpqa", "gpqa", gpqa).load()
    assert it.id == "rec0" and len(it.choices) == 4 and it.choices[ord(it.answer) - 65] == "right"

    bundled = Benchmark("bundled", "bundled", "bundled_eval", limit=5).load()
    assert len(bundled) == 5 and not bundled[0].choices


def test_benchmark_errors_name_the_key_and_fix(tmp_path):
    with pytest.raises(EnigmaError, match=r"benchmark\.gpqa\.path.*local"):
        Benchmark("gpqa", "gpqa", "no-such-owner/no-such-dataset", subset="x").load()
    bad = _write(tmp_path / "bad.jsonl", [{"question": "q"}])
    with pytest.raises(EnigmaError, match=r"benchmark\.tqa: row 0 .*mc1_targets|benchmark\.tqa: row 0"):
        Benchmark("tqa", "truthfulqa_mc", bad).load()


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A 4-step smoke run on the tiny model, with the probe callback on."""
    from hydra import compose, initialize_config_module

    from enigma_lightning.commands.train import run

    out = tmp_path_factory.mktemp("trained") / "run"
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", "experiment=smoke", "callbacks=probes",
                                          "callbacks.probes.every_n_steps=2", "callbacks.probes.num_questions=2",
                                          "optim.optimizer.lr=1e-3", *SIGNAL])
    run(cfg)
    return out


def _compose(name, *overrides):
    from hydra import compose, initialize_config_module

    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        return compose(name, overrides=list(overrides))


def test_probe_callback_during_training(trained_run):
    import csv

    for step in (2, 4):
        result = json.loads((trained_run / "probes" / f"step{step:06d}" / "probe.json").read_text())
        assert result["per_layer"]["sinkhorn"][-1] > 0  # the policy has moved from its base
    with open(trained_run / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("probe/cka/last")]
    assert [int(r["step"]) for r in rows] == [1, 3] and all(float(r["probe/cka/last"]) < 1 for r in rows)


def test_checkpoint_and_exported_policy_load_the_same_weights(trained_run):
    from enigma_lightning.runtime.checkpoints import load_policy_from, merge_run_config

    def cfg(ckpt):
        return merge_run_config(_compose("evaluate", "model=tiny", "paths.output_dir=unused", f"ckpt_path={ckpt}"))

    from_ckpt, _ = load_policy_from(cfg(trained_run / "checkpoints/last.ckpt"))
    from_dir, _ = load_policy_from(cfg(trained_run / "policy"))
    untrained, _ = load_policy_from(cfg("null"))
    a, b, c = from_ckpt.state_dict(), from_dir.state_dict(), untrained.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)


def test_evaluate_end_to_end_on_a_checkpoint(trained_run, tmp_path, capsys):
    from enigma_lightning.commands.evaluate import run

    out = tmp_path / "eval"
    cfg = _compose("evaluate", f"ckpt_path={trained_run / 'checkpoints/last.ckpt'}", "benchmark.bundled.limit=6",
                   "rollout.max_new_tokens=12", "wandb_mode=offline", f"paths.output_dir={out}", "batch_size=4")
    report = run(cfg)
    # generation says what it is doing before it starts (and a progress bar counts the questions)
    assert "bundled: generating answers to 6 questions (2 batches of up to 4)" in capsys.readouterr().out
    m = report["results"]["bundled"]
    assert m["num_items"] == 6 and all(0 <= m[k] <= 1 for k in ("accuracy", "format_rate", "truncated_rate"))
    assert 0 < m["mean_length"] <= 12
    assert report["config"]["model"]["name_or_path"] == "tiny:llama"  # from the run's config.yaml
    records = [json.loads(x) for x in (out / "samples_bundled.jsonl").read_text().splitlines()]
    assert len(records) == 6 and records[0]["prompt"] == report["example_prompts"]["bundled"]
    assert "<reasoning>" in records[0]["prompt"] and records[0]["completion"].startswith("<reasoning>")
    assert (out / "eval.md").read_text().count("| bundled | 6 |") == 1
    assert list((out / "wandb").glob("offline-run-*"))


def test_evaluate_and_probe_clis_report_a_missing_checkpoint(tmp_path):
    from helpers import run_cli

    for module in ("enigma_lightning.evaluate", "enigma_lightning.probe"):
        r = run_cli(module, f"ckpt_path={tmp_path}/nope.ckpt", f"hydra.run.dir={tmp_path}/o", "wandb_mode=disabled")
        assert r.returncode == 2 and "ckpt_path" in r.stderr and "does not exist" in r.stderr, r.stderr[-2000:]


def test_probe_cli_on_a_checkpoint(trained_run, tmp_path):
    from helpers import run_cli

    out = tmp_path / "probe"
    r = run_cli("enigma_lightning.probe", f"ckpt_path={trained_run / 'checkpoints/last.ckpt'}", "num_questions=3",
                f"hydra.run.dir={out}", "wandb_mode=offline")
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads((out / "probe.json").read_text())
    assert result["reference"] == "tiny:llama" and result["num_questions"] == 3
    assert result["per_layer"]["cka"][-1] < 1 and result["per_layer"]["fisher_rao"][-1] > 0
    assert (out / "probe_layers.png").exists() and list((out / "wandb").glob("offline-run-*"))


def test_lora_checkpoint_and_adapter_folder_load_merged(tmp_path):
    from transformers import AutoModelForCausalLM

    from enigma_lightning.commands.train import run
    from enigma_lightning.models.tiny import build_tiny_llama
    from enigma_lightning.runtime.checkpoints import load_policy_from, merge_run_config

    out = tmp_path / "lora"
    run(_compose("train", f"paths.output_dir={out}", "experiment=smoke", "trainer.max_steps=2", "peft=lora",
                 "peft.target_modules=[q_proj,v_proj]", "optim.optimizer.lr=1e-2", "trainer.limit_val_batches=0",
                 *SIGNAL))

    def load(ckpt):
        return load_policy_from(merge_run_config(_compose("evaluate", "paths.output_dir=x", f"ckpt_path={ckpt}")))[0]

    a, b = load(out / "checkpoints/last.ckpt").state_dict(), load(out / "policy").state_dict()
    assert not any("lora_" in k for k in a) and set(a) == set(b)
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    tiny = AutoModelForCausalLM.from_pretrained(build_tiny_llama()).state_dict()
    assert any(not torch.allclose(a[k], tiny[k]) for k in a if "q_proj" in k)  # the adapter was merged in
