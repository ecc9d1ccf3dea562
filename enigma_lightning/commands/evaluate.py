"""Benchmark evaluation of a trained checkpoint or an untrained baseline.

    python -m enigma_lightning.evaluate ckpt_path=<run>/checkpoints/last.ckpt "benchmark=[bundled,gpqa,truthfulqa_mc]"
    python -m enigma_lightning.evaluate model=Qwen/Qwen2.5-0.5B-Instruct                  # baseline, bundled only

Each question is rendered with the same chat prompt as training (principle set, format instructions, worked example,
``<reasoning>`` prefill); with a run's checkpoint, the run's prompt and principles are used (``use_run_config``).
Decoding is greedy by default (``decoding=sample`` uses ``rollout.temperature`` / ``rollout.top_p``).

Per benchmark: ``accuracy`` (strict format and the right answer, as ``val/accuracy`` in training),
``accuracy_lenient`` (the right answer in the last ``<answer>`` block, format aside), ``format_rate`` (strict),
``answered_rate`` (an answer could be read), ``mean_length`` (completion tokens), ``truncated_rate``, and the
chance level for multiple choice. Outputs in the output folder: ``eval.json`` (metrics, config, one rendered prompt
per benchmark), ``eval.md``, ``samples_<benchmark>.jsonl`` (every prompt, completion and verdict), and a W&B run.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from ..data.evalsets import Benchmark, Item, score
from ..rollout.hf import generate
from ..runtime.cli import hydra_command

METRICS = ("accuracy", "accuracy_lenient", "format_rate", "answered_rate", "mean_length", "truncated_rate")


def evaluate_items(model, tok, prompt, principles: str, items: list[Item], sampling, greedy: bool = True,
                   batch_size: int = 16, desc: str = "eval") -> tuple[dict[str, float], list[dict[str, Any]]]:
    """(metrics, per-item records) for ``items``; a progress bar (``desc``) counts the questions answered."""
    from tqdm.auto import tqdm

    records = []
    batches = -(-len(items) // batch_size)
    print(f"{desc}: generating answers to {len(items)} questions ({batches} batches of up to {batch_size})", flush=True)
    bar = tqdm(total=len(items), desc=desc, unit="question", dynamic_ncols=True)
    for s in range(0, len(items), batch_size):
        chunk = items[s : s + batch_size]
        prompts = [prompt.render(tok, it.question, principles) for it in chunk]
        ro = generate(model, tok, prompts, 1, sampling, prefill=prompt.prefill, greedy=greedy)
        for it, p, c, n, tr in zip(chunk, prompts, ro.completions, ro.lengths.tolist(), ro.truncated.tolist(),
                                   strict=True):
            records.append({"id": it.id, "prompt": p, "completion": c, "answer": it.answer, "length": int(n),
                            "truncated": bool(tr), **score(it, c)})
        bar.update(len(chunk))
    bar.close()
    n = max(len(records), 1)
    metrics = {
        "accuracy": sum(r["correct"] for r in records) / n,
        "accuracy_lenient": sum(r["correct_lenient"] for r in records) / n,
        "format_rate": sum(r["strict"] for r in records) / n,
        "answered_rate": sum(r["predicted"] is not None for r in records) / n,
        "mean_length": sum(r["length"] for r in records) / n,
        "truncated_rate": sum(r["truncated"] for r in records) / n,
        "num_items": len(records),
    }
    if items and items[0].choices:
        metrics["chance"] = sum(1 / len(it.choices) for it in items) / len(items)
    return metrics, records


def write_table(results: dict[str, dict[str, float]], out: Path, title: str) -> str:
    cols = ["benchmark", "n", *METRICS, "chance"]
    lines = [f"# Evaluation: {title}", "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, m in results.items():
        vals = [f"{m[k]:.3f}" if k != "mean_length" else f"{m[k]:.1f}" for k in METRICS]
        lines.append(f"| {name} | {m['num_items']} | " + " | ".join(vals) + (f" | {m['chance']:.3f} |" if "chance" in m else " | - |"))
    text = "\n".join(lines) + "\n"
    (out / "eval.md").write_text(text)
    return text


def run(cfg: DictConfig) -> dict[str, Any]:
    from hydra.utils import instantiate

    from ..errors import EnigmaError
    from ..runtime.checkpoints import device_for, load_policy_from, merge_run_config

    cfg = merge_run_config(cfg)
    if not cfg.get("benchmark"):
        raise EnigmaError("benchmark selects nothing. Use benchmark=bundled or \"benchmark=[bundled,gpqa,truthfulqa_mc]\"")
    if cfg.decoding not in ("greedy", "sample"):
        raise EnigmaError(f"decoding must be greedy or sample; got {cfg.decoding!r}. Set decoding=greedy")
    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    benches: dict[str, Benchmark] = {name: instantiate(node, name=name) for name, node in cfg.benchmark.items()}
    items = {name: b.load() for name, b in benches.items()}  # load every benchmark before the model: fail early
    model, tok = load_policy_from(cfg)
    model = model.to(device_for(cfg.device))
    prompt, principles, sampling = instantiate(cfg.prompt), instantiate(cfg.principles), instantiate(cfg.rollout)
    what = str(cfg.ckpt_path or cfg.model.name_or_path)
    results, examples, samples = {}, {}, {}
    for name, its in items.items():
        t0 = time.perf_counter()
        metrics, records = evaluate_items(model, tok, prompt, principles.text, its, sampling,
                                          greedy=cfg.decoding == "greedy", batch_size=cfg.batch_size, desc=name)
        metrics["seconds"] = time.perf_counter() - t0
        results[name] = metrics
        examples[name] = records[0]["prompt"] if records else ""
        samples[name] = records
        with open(out / f"samples_{name}.jsonl", "w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        print(f"{name}: accuracy {metrics['accuracy']:.3f} (lenient {metrics['accuracy_lenient']:.3f}), format "
              f"{metrics['format_rate']:.3f}, mean length {metrics['mean_length']:.1f} tokens, "
              f"{metrics['num_items']} items, {metrics['seconds']:.0f} s")
    report = {"model": what, "principles": principles.name, "decoding": cfg.decoding, "results": results,
              "example_prompts": examples, "config": OmegaConf.to_container(cfg, resolve=True)}
    (out / "eval.json").write_text(json.dumps(report, indent=2))
    print(write_table(results, out, what))
    _log_wandb(cfg, out, results, samples)
    return report


def _log_wandb(cfg: DictConfig, out: Path, results: dict[str, dict[str, float]],
               samples: dict[str, list[dict[str, Any]]]) -> None:
    from ..runtime.loggers import wandb_run

    run = wandb_run(cfg, out, "evaluate")
    if run is None:
        return
    import wandb

    for name, m in results.items():
        run.summary.update({f"eval/{name}/{k}": v for k, v in m.items()})
        rows = samples[name][:64]
        cols = ["id", "completion", "answer", "predicted", "strict", "correct"]
        run.log({f"eval/{name}/samples": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in rows])})
    run.finish()


main, cli = hydra_command(run, "evaluate")


if __name__ == "__main__":
    cli()
