"""lm-evaluation-harness on an exported policy, offline: a multiple-choice task of our own on a local file."""

import json
import math

import pytest

pytest.importorskip("lm_eval")

QUESTIONS = [
    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1},
    {"question": "The capital of France is", "choices": ["Paris", "Rome", "Berlin"], "answer": 0},
    {"question": "Water freezes at", "choices": ["0 C", "50 C", "100 C"], "answer": 0},
    {"question": "3 * 3 =", "choices": ["6", "8", "9"], "answer": 2},
]


def local_task(folder, name="enigma_local_mc"):
    """A task YAML in ``folder`` reading a local jsonl (lm-eval's ``dataset_path: json``); no hub access."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "questions.jsonl"
    data.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return folder


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    """The exported policy/ folder of a one-step run on the tiny model."""
    from hydra import compose, initialize_config_module

    from enigma_lightning.commands.train import run

    out = tmp_path_factory.mktemp("run")
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={out}", "experiment=smoke", "trainer.max_steps=1",
                                          "callbacks.checkpoint=null"])
    assert run(cfg)["status"] == "finished"
    return out / "policy"


def test_lm_eval_on_the_exported_policy_with_a_local_task(policy_dir, tmp_path):
    from helpers import run_cli

    tasks, out = local_task(tmp_path / "tasks"), tmp_path / "eval"
    r = run_cli("enigma_lightning.lm_eval", f"ckpt_path={policy_dir}", "tasks=[enigma_local_mc]",
                f"include_path={tasks}", "log_samples=true", "bootstrap_iters=0", "device=cpu",
                f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((out / "lm_eval.json").read_text())
    assert report["config"]["model"] == "hf" and str(policy_dir) in report["config"]["model_args"]["pretrained"]
    acc = report["results"]["enigma_local_mc"]["acc,none"]
    samples = [json.loads(line) for line in (out / "samples_enigma_local_mc.jsonl").read_text().splitlines()]
    assert len(samples) == len(QUESTIONS)
    # acc is lm-eval's: the choice of highest log-likelihood is the target
    picked = [max(range(3), key=lambda i, s=s: float(s["filtered_resps"][i][0])) for s in samples]
    assert math.isclose(acc, sum(p == s["target"] for p, s in zip(picked, samples, strict=True)) / len(QUESTIONS))
    assert "enigma_local_mc" in (out / "lm_eval.md").read_text()


def test_lm_eval_errors_name_the_key_and_the_fix(policy_dir, tmp_path):
    from helpers import run_cli

    r = run_cli("enigma_lightning.lm_eval", f"ckpt_path={policy_dir}", "tasks=[no_such_task]",
                f"hydra.run.dir={tmp_path / 'a'}")
    assert r.returncode == 2 and "tasks: ['no_such_task'] are not lm-eval tasks" in r.stderr and \
        "include_path=<folder>" in r.stderr, r.stderr[-2000:]
    r = run_cli("enigma_lightning.lm_eval", f"ckpt_path={policy_dir}", f"include_path={tmp_path / 'missing'}",
                f"hydra.run.dir={tmp_path / 'b'}")
    assert r.returncode == 2 and "include_path: folder" in r.stderr and "does not exist" in r.stderr


def test_the_configured_tasks_include_gpqa_and_truthfulqa():
    from hydra import compose, initialize_config_module
    from lm_eval.tasks import TaskManager

    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("lm_eval", overrides=["paths.output_dir=/tmp/unused"])
    known = set(TaskManager().all_tasks)
    assert {"truthfulqa_mc1", "gpqa_main_zeroshot"} <= set(cfg.tasks) <= known
