"""Sufficiency Index of principle sets, on the base model, before training.

    python -m enigma_lightning.si principles=high_si                      # one set
    python -m enigma_lightning.si "sets=[high_si,low_si,default]"         # rank several in one process
    python -m enigma_lightning.si --multirun principles=high_si,low_si    # one job per set, table at the end

For a set with K variants and N held-out questions, one chain of thought is generated per (question, variant), then
every CoT is scored under every variant's prompt (mean token log-prob): a K x K matrix per question. From these:
I_hat = log K - L_sym (the InfoNCE bound, nats and bits), SI = I_hat / log K, top-1 identification accuracy by row
(which CoT belongs to this prompt) and by column (which prompt produced this CoT), and a bootstrap confidence
interval of SI over questions. The metrics are the ones the SAMI training term logs (:mod:`.metrics.infonce`).
Outputs: ``si.json`` per set, and for several sets ``si_table.md``, ``si_table.csv`` and ``si_bar.png``; all logged
to W&B (offline without an API key).
"""

from __future__ import annotations

import csv
import importlib.resources
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ..losses.base import Layout
from ..losses.sami import cell_scores, sami_rows
from ..metrics.infonce import infonce_metrics, per_matrix_infonce
from ..rollout.hf import generate
from ..rollout.logprobs import per_token_logps
from ..runtime.cli import hydra_command


def load_questions(path: str, n: int, seed: int) -> list[str]:
    import random

    from ..data.datasets import load_rows

    rows = load_rows(path)
    random.Random(seed).shuffle(rows)
    return [r["source"] for r in rows[:n]]


@torch.no_grad()
def score_matrices(model, tok, prompt, variants: list[str], questions: list[str], sampling, greedy: bool,
                   chunk: int = 8) -> torch.Tensor:
    """[N, K, K]: S[q, i, j] = mean token log-prob of the CoT generated under variant j, prompted with variant i."""
    k = len(variants)
    out = []
    for start in range(0, len(questions), chunk):
        qs = questions[start : start + chunk]
        prompts = [prompt.render(tok, q, v) for q in qs for v in variants]  # (question, variant)
        ro = generate(model, tok, prompts, 1, sampling, prefill=prompt.prefill, greedy=greedy)
        layout = Layout(len(qs), k, k)  # one CoT per (question, variant): SAMI's cells with m = 1
        p_rows, c_rows, _ = sami_rows(layout)
        logps, _ = per_token_logps(model, ro.prompt_ids[p_rows], ro.prompt_mask[p_rows], ro.completion_ids[c_rows],
                                   ro.completion_mask[c_rows], sampling.temperature, num_generations=k,
                                   shared_prompt=True, prefixes=ro.prefixes)
        out.append(cell_scores(logps, ro.completion_mask[c_rows], layout)[..., 0])
    return torch.cat(out)


def summarize(scores: torch.Tensor, bootstrap: int = 1000, ci: float = 0.95, seed: int = 0) -> dict[str, float]:
    """SI and friends from [N, K, K] scores, with a bootstrap CI of SI over questions."""
    k = scores.size(-1)
    m = {key: float(v) for key, v in infonce_metrics(scores).items()}
    per_q = per_matrix_infonce(scores).double()  # [N]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, per_q.numel(), (bootstrap, per_q.numel()), generator=g)
    si_b = (math.log(k) - per_q[idx].mean(1)) / math.log(k)
    lo, hi = torch.quantile(si_b, torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)).tolist()
    return {**m, "si_ci_low": lo, "si_ci_high": hi, "ci": ci, "num_questions": int(scores.size(0)), "num_variants": k}


def write_table(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """si_table.md, si_table.csv and si_bar.png, sets ranked by SI."""
    results = sorted(results, key=lambda r: -r["si"])
    cols = ["set", "si", "si_ci_low", "si_ci_high", "mi_bound", "mi_bound_bits", "acc_row", "acc_col", "num_questions",
            "num_variants", "seconds"]
    with open(out_dir / "si_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    lines = ["| set | SI | 95% CI | I_hat (nats) | I_hat (bits) | acc row | acc col | N | K | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['set']} | {r['si']:.3f} | [{r['si_ci_low']:.3f}, {r['si_ci_high']:.3f}] | {r['mi_bound']:.3f} "
                     f"| {r['mi_bound_bits']:.3f} | {r['acc_row']:.2f} | {r['acc_col']:.2f} | {r['num_questions']} "
                     f"| {r['num_variants']} | {r['seconds']:.0f} |")
    (out_dir / "si_table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(results), 3.2))
    names, si = [r["set"] for r in results], [r["si"] for r in results]
    err = [[max(r["si"] - r["si_ci_low"], 0) for r in results], [max(r["si_ci_high"] - r["si"], 0) for r in results]]
    ax.bar(names, si, yerr=err, capsize=4, color="#4C72B0")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("Sufficiency Index")
    ax.set_title("Principle sets ranked by SI")
    fig.tight_layout()
    fig.savefig(out_dir / "si_bar.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    return out_dir / "si_table.md"


def _log_wandb(cfg: DictConfig, out_dir: Path, results: list[dict], table: bool) -> None:
    from ..runtime.loggers import wandb_run

    run = wandb_run(cfg, out_dir, "si")
    if run is None:
        return
    import wandb

    for r in results:
        run.summary.update({f"si/{r['set']}/{k}": v for k, v in r.items() if isinstance(v, int | float)})
    if table:
        cols = list(results[0])
        run.log({"si/table": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in results]),
                 "si/bar": wandb.Image(str(out_dir / "si_bar.png"))})
    run.finish()


def principle_set(name: str):
    from hydra.utils import instantiate

    path = importlib.resources.files("enigma_lightning.conf") / "principles" / f"{name}.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"sets: no principle set {name!r} in conf/principles/")
    return instantiate(OmegaConf.load(str(path)))


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    from hydra.utils import instantiate

    from ..models.loading import load_policy, load_tokenizer

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    spec = instantiate(cfg.model)
    tok, model = load_tokenizer(spec), load_policy(spec)
    model.eval()
    prompt, sampling = instantiate(cfg.prompt), instantiate(cfg.rollout)
    questions = load_questions(cfg.questions, cfg.num_questions, cfg.seed)
    sets = [principle_set(n) for n in cfg.sets] if cfg.get("sets") else [instantiate(cfg.principles)]
    results = []
    for ps in sets:
        variants = ps.all_variants()[: cfg.num_variants]
        if len(variants) < 2:
            raise ValueError(f"principles={ps.name} has {len(variants)} variant(s); SI needs at least 2.")
        t0 = time.perf_counter()
        scores = score_matrices(model, tok, prompt, variants, questions, sampling, greedy=cfg.decoding == "greedy")
        r = {"set": ps.name, **summarize(scores, cfg.bootstrap, cfg.ci, cfg.seed),
             "seconds": time.perf_counter() - t0}
        (out / (f"si_{ps.name}.json" if len(sets) > 1 else "si.json")).write_text(json.dumps(r, indent=2))
        print(f"{ps.name}: SI {r['si']:.3f} [{r['si_ci_low']:.3f}, {r['si_ci_high']:.3f}], "
              f"I_hat {r['mi_bound']:.3f} nats ({r['mi_bound_bits']:.3f} bits), acc row {r['acc_row']:.2f} "
              f"col {r['acc_col']:.2f}, {r['seconds']:.0f} s")
        results.append(r)
    if len(results) > 1:
        write_table(results, out)
    _log_wandb(cfg, out, results, table=len(results) > 1)
    return results


class SITableCallback(Callback):
    """After ``--multirun``, rank every job's set in the sweep folder (si_table.md/.csv, si_bar.png)."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep = Path(config.hydra.sweep.dir)
        results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/si.json"))]
        if results:
            write_table(results, sweep)


main, cli = hydra_command(run, "si")


if __name__ == "__main__":
    cli()
