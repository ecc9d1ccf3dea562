"""Sufficiency Index of principle sets, on the base model, before training.

    python -m enigma_lightning.si principles=high_si                      # one set
    python -m enigma_lightning.si "sets=[high_si,low_si,default]"         # rank several in one process
    python -m enigma_lightning.si --multirun principles=high_si,low_si    # one job per set, table at the end

For a set with K variants and N held-out questions, one chain of thought is generated per (question, variant), then
every CoT is scored under every variant's prompt (mean token log-prob): a K x K matrix per question. From these:
I_hat = log K - L_sym (the InfoNCE bound, nats and bits), SI = I_hat / log K, top-1 identification accuracy by row
(which CoT belongs to this prompt) and by column (which prompt produced this CoT), and a bootstrap confidence
interval of SI over questions. The metrics are the ones the SAMI training term logs (:mod:`.metrics.infonce`).

Controls, beside every set:

- the **null control** (free: the same matrices): each question's CoTs shuffled across the variants' labels, SI
  recomputed, ``permutations`` times. Its mean and 95% range are what SI looks like when the CoTs carry no trace of
  which variant produced them (~0, a range covering 0), and the share of shuffles reaching the measured SI is the
  set's **permutation p-value**. A set with ``p >= alpha`` is marked indistinguishable from the null.
- ``self_control=true`` also runs the whole measurement with every variant replaced by the set's own text (the set
  against itself): exactly 0 under greedy decoding (the CoTs are identical), slightly below 0 with sampled CoTs (no
  CoT is told apart better than chance, and the InfoNCE bound of CoTs of unequal likelihood falls under 0): a check
  of the pipeline itself. The shuffled null is not exactly 0 either, for the same reason; at the scale of real
  scores (prompt effects of hundredths of a nat per token) it is within a few thousandths of 0.
- ``cots_differ``: the share of questions whose K CoTs are not all the same text (0 when the principles change
  nothing the model writes).

Outputs: ``si.json`` per set (``si_<set>.json`` for several), ``samples.jsonl`` (every CoT with its question,
variant and its scores under every variant's prompt: what the number was computed from), and for several sets
``si_table.md``, ``si_table.csv`` and ``si_bar.png``; all logged to W&B (offline without an API key), the samples as
a table.
"""

from __future__ import annotations

import csv
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ..losses.base import Layout
from ..losses.sami import cell_scores, sami_rows
from ..metrics.infonce import infonce_metrics, per_matrix_infonce
from ..rollout.hf import generate
from ..rollout.logprobs import per_token_logps
from ..runtime.cli import hydra_command


def load_questions(path: str, n: int, seed: int, offset: int = 0) -> list[str]:
    """``n`` questions of ``path`` in a seeded shuffle, from position ``offset`` (disjoint slices for disjoint sets)."""
    import random

    from ..data.datasets import load_rows
    from ..errors import EnigmaError

    rows = load_rows(path)
    random.Random(seed).shuffle(rows)
    if offset + n > len(rows):
        raise EnigmaError(f"questions={path} has {len(rows)} questions; {offset + n} are needed here "
                          f"(num_questions={n} from position {offset}). Lower num_questions or use a larger file")
    return [r["source"] for r in rows[offset : offset + n]]


@torch.no_grad()
def score_matrices(model, tok, prompt, variants: list[str], questions: list[str], sampling, greedy: bool,
                   chunk: int = 8) -> tuple[torch.Tensor, list[list[str]]]:
    """([N, K, K], CoTs [N][K]): S[q, i, j] = mean token log-prob of the CoT generated under variant j, prompted with
    variant i; CoTs[q][j] the text of that CoT (the assistant prefill included)."""
    k = len(variants)
    out, texts = [], []
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
        texts += [ro.completions[q * k : (q + 1) * k] for q in range(len(qs))]
    return torch.cat(out), texts


def _quantiles(x: torch.Tensor, ci: float) -> tuple[float, float]:
    lo, hi = torch.quantile(x.double(), torch.tensor([(1 - ci) / 2, (1 + ci) / 2], dtype=torch.float64)).tolist()
    return lo, hi


def shuffled_si(scores: torch.Tensor, permutations: int, seed: int = 0) -> torch.Tensor:
    """SI [permutations] of ``scores`` [N, K, K] with each question's CoTs (columns) given to the variants in a random
    order, drawn anew per question and per permutation: the distribution of SI when the CoTs carry no trace of the
    variant that produced them (labels exchangeable within a question)."""
    n, k, _ = scores.shape
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.rand(permutations, n, k, generator=g).argsort(-1)  # [P, N, K]
    s = scores.double().unsqueeze(0).expand(permutations, n, k, k)
    shuffled = torch.gather(s, 3, perm.unsqueeze(2).expand(permutations, n, k, k))
    return (math.log(k) - per_matrix_infonce(shuffled).mean(-1)) / math.log(k)


def summarize(scores: torch.Tensor, bootstrap: int = 1000, ci: float = 0.95, seed: int = 0,
              permutations: int = 2000, alpha: float = 0.05) -> dict[str, Any]:
    """SI and friends from [N, K, K] scores: a bootstrap CI of SI over questions, and the null control (SI of the
    shuffled labels, :func:`shuffled_si`): its mean and range, and the permutation p-value of the measured SI (the
    share of shuffles, the measured labelling counted among them, with an SI at least as high)."""
    k = scores.size(-1)
    m = {key: float(v) for key, v in infonce_metrics(scores).items()}
    per_q = per_matrix_infonce(scores.double())  # [N], float64 as the shuffles are computed
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, per_q.numel(), (bootstrap, per_q.numel()), generator=g)
    lo, hi = _quantiles((math.log(k) - per_q[idx].mean(1)) / math.log(k), ci)
    out = {**m, "si_ci_low": lo, "si_ci_high": hi, "ci": ci, "num_questions": int(scores.size(0)), "num_variants": k}
    if permutations:
        null = shuffled_si(scores, permutations, seed)
        si = (math.log(k) - per_q.mean()) / math.log(k)
        null_lo, null_hi = _quantiles(null, ci)
        # a shuffle that leaves the matrices as they are (identical CoTs, or the labelling itself) ties with the
        # measured SI up to rounding: counted as reaching it
        p = (1 + int((null >= si - 1e-9).sum())) / (1 + permutations)
        out.update(null_si=float(null.mean()), null_low=null_lo, null_high=null_hi, p_value=p,
                   permutations=permutations, alpha=alpha, separated=p < alpha)
    return out


def cots_differ(completions: list[list[str]]) -> float:
    """The share of questions whose CoTs are not all the same text."""
    return sum(len(set(c)) > 1 for c in completions) / max(len(completions), 1)


def sample_rows(set_name: str, variants: list[str], questions: list[str], completions: list[list[str]],
                scores: torch.Tensor) -> list[dict[str, Any]]:
    """One record per CoT: its question and variant, the text, ``scores_under_prompts`` (its mean token log-prob
    under each variant's prompt: its column of the question's score matrix), ``prompt_row`` (every CoT of the
    question under this variant's prompt: the matrix row) and whether its own prompt scores it highest."""
    rows = []
    for q, (question, cots) in enumerate(zip(questions, completions, strict=True)):
        mat = scores[q].tolist()
        for j, cot in enumerate(cots):
            column = [mat[i][j] for i in range(len(variants))]
            rows.append({"set": set_name, "question_index": q, "question": question, "variant_index": j,
                         "variant": variants[j], "cot": cot, "scores_under_prompts": column,
                         "prompt_row": mat[j], "identified": max(range(len(column)), key=column.__getitem__) == j})
    return rows


def measure(model, tok, prompt, sampling, name: str, variants: list[str], questions: list[str], cfg: DictConfig,
            self_control: bool = False) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(result, samples) of one principle set: SI with its interval and controls, and the evidence
    (:func:`sample_rows`). ``cfg`` gives decoding, bootstrap, ci, seed, permutations and alpha."""
    t0 = time.perf_counter()
    greedy = cfg.decoding == "greedy"
    scores, cots = score_matrices(model, tok, prompt, variants, questions, sampling, greedy=greedy)
    r = {"set": name, **summarize(scores, cfg.bootstrap, cfg.ci, cfg.seed, cfg.permutations, cfg.alpha),
         "cots_differ": cots_differ(cots)}
    if self_control:
        same, _ = score_matrices(model, tok, prompt, [variants[0]] * len(variants), questions, sampling, greedy=greedy)
        ctl = summarize(same, cfg.bootstrap, cfg.ci, cfg.seed, permutations=0)
        r.update(self_si=ctl["si"], self_ci_low=ctl["si_ci_low"], self_ci_high=ctl["si_ci_high"])
    r["seconds"] = time.perf_counter() - t0
    return r, sample_rows(name, variants, questions, cots, scores)


def describe(r: dict[str, Any]) -> str:
    """One line per set: SI, its interval, the null control and the verdict."""
    line = (f"{r['set']}: SI {r['si']:.4f} [{r['si_ci_low']:.4f}, {r['si_ci_high']:.4f}], I_hat {r['mi_bound']:.4f} "
            f"nats ({r['mi_bound_bits']:.4f} bits), acc row {r['acc_row']:.2f} col {r['acc_col']:.2f}, CoTs differ "
            f"in {r['cots_differ']:.0%} of questions")
    if "p_value" in r:
        line += (f"; null (shuffled) {r['null_si']:.4f} [{r['null_low']:.4f}, {r['null_high']:.4f}], p = "
                 f"{r['p_value']:.4f}: {'separated from' if r['separated'] else 'indistinguishable from'} the null")
    if "self_si" in r:
        line += f"; self control {r['self_si']:.4f} [{r['self_ci_low']:.4f}, {r['self_ci_high']:.4f}]"
    return line + f", {r['seconds']:.0f} s"


def verdict(r: dict[str, Any]) -> str:
    if "p_value" not in r:
        return "-"
    return "separated" if r["separated"] else "≈ null"


TABLE_COLUMNS = ["set", "si", "si_ci_low", "si_ci_high", "null_si", "null_low", "null_high", "p_value", "separated",
                 "cots_differ", "self_si", "self_ci_low", "self_ci_high", "mi_bound", "mi_bound_bits", "acc_row",
                 "acc_col", "num_questions", "num_variants", "seconds"]


def write_table(results: list[dict[str, Any]], out_dir: Path) -> Path:
    """si_table.md, si_table.csv and si_bar.png, sets ranked by SI, each beside its null control."""
    results = sorted(results, key=lambda r: -r["si"])
    with open(out_dir / "si_table.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in TABLE_COLUMNS if any(c in r for r in results)],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(results)
    has_self = any("self_si" in r for r in results)
    lines = ["| set | SI | 95% CI | null (shuffled) | p | vs null | CoTs differ |" + (" self control |" if has_self else "")
             + " I_hat (nats) | I_hat (bits) | acc row | acc col | N | K | seconds |",
             "|---|---|---|---|---|---|---|" + ("---|" if has_self else "") + "---|---|---|---|---|---|---|"]
    for r in results:
        null = (f"{r['null_si']:.4f} [{r['null_low']:.4f}, {r['null_high']:.4f}]", f"{r['p_value']:.4f}") \
            if "p_value" in r else ("-", "-")
        ctl = (f" {r['self_si']:.4f} [{r['self_ci_low']:.4f}, {r['self_ci_high']:.4f}] |" if "self_si" in r else " - |") \
            if has_self else ""
        lines.append(f"| {r['set']} | {r['si']:.4f} | [{r['si_ci_low']:.4f}, {r['si_ci_high']:.4f}] | {null[0]} "
                     f"| {null[1]} | {verdict(r)} | {r.get('cots_differ', float('nan')):.0%} |{ctl} {r['mi_bound']:.4f} "
                     f"| {r['mi_bound_bits']:.4f} | {r['acc_row']:.2f} | {r['acc_col']:.2f} | {r['num_questions']} "
                     f"| {r['num_variants']} | {r['seconds']:.0f} |")
    lines += ["", "null: SI with each question's CoTs shuffled across the variants (mean and 95% range over the "
              "shuffles); p: the share of shuffles reaching the measured SI; ≈ null: p >= alpha."]
    (out_dir / "si_table.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.2 * len(results), 3.2))
    names, si = [r["set"] for r in results], [r["si"] for r in results]
    err = [[max(r["si"] - r["si_ci_low"], 0) for r in results], [max(r["si_ci_high"] - r["si"], 0) for r in results]]
    colors = ["#4C72B0" if r.get("separated", True) else "#B0B0B0" for r in results]
    ax.bar(names, si, yerr=err, capsize=4, color=colors)
    for x, r in enumerate(results):  # the null control's 95% range behind each bar
        if "null_low" in r:
            ax.plot([x - 0.4, x + 0.4], [r["null_high"]] * 2, color="#C44E52", linewidth=1, linestyle="--")
            ax.plot([x - 0.4, x + 0.4], [r["null_low"]] * 2, color="#C44E52", linewidth=1, linestyle="--")
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("Sufficiency Index")
    ax.set_title("Principle sets by SI (dashed: null control's 95% range; grey: ≈ null)", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "si_bar.png", dpi=120)
    plt.close(fig)
    print("\n".join(lines))
    return out_dir / "si_table.md"


def write_samples(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


SAMPLE_COLUMNS = ["set", "question_index", "variant_index", "cot", "scores_under_prompts", "identified", "question"]


def _log_wandb(cfg: DictConfig, out_dir: Path, results: list[dict], samples: list[dict], table: bool) -> None:
    from ..runtime.loggers import wandb_run

    run = wandb_run(cfg, out_dir, "si")
    if run is None:
        return
    import wandb

    for r in results:
        run.summary.update({f"si/{r['set']}/{k}": v for k, v in r.items() if isinstance(v, int | float)})
    logged = {"si/samples": wandb.Table(columns=SAMPLE_COLUMNS,
                                        data=[[str(s[c]) if c == "scores_under_prompts" else s[c] for c in SAMPLE_COLUMNS]
                                              for s in samples])}
    if table:
        cols = [c for c in TABLE_COLUMNS if all(c in r for r in results)]
        logged.update({"si/table": wandb.Table(columns=cols, data=[[r[c] for c in cols] for r in results]),
                       "si/bar": wandb.Image(str(out_dir / "si_bar.png"))})
    run.log(logged)
    run.finish()


def load_model(cfg: DictConfig):
    """(tokenizer, model in eval mode on the first GPU if there is one, prompt, sampling) of a command's config."""
    from hydra.utils import instantiate

    from ..models.loading import load_policy, load_tokenizer

    spec = instantiate(cfg.model)
    tok, model = load_tokenizer(spec), load_policy(spec)
    model.eval().to("cuda" if torch.cuda.is_available() else "cpu")  # on the GPU where there is one
    return tok, model, instantiate(cfg.prompt), instantiate(cfg.rollout)


def run(cfg: DictConfig) -> list[dict[str, Any]]:
    from hydra.utils import instantiate

    from ..errors import EnigmaError

    out = Path(cfg.paths.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..data.principles import principle_set

    sets = [principle_set(str(n)) for n in cfg.sets] if cfg.get("sets") else [instantiate(cfg.principles)]
    for ps in sets:
        if len(ps.all_variants()[: cfg.num_variants]) < 2:
            raise EnigmaError(f"principles={ps.name} has {len(ps.all_variants())} variant(s); SI needs at least 2 "
                              "(text and antithesis). Add an antithesis to the set")
    questions = load_questions(cfg.questions, cfg.num_questions, cfg.seed)
    torch.manual_seed(cfg.seed)
    tok, model, prompt, sampling = load_model(cfg)
    results, samples = [], []
    for ps in sets:
        variants = ps.all_variants()[: cfg.num_variants]
        r, rows = measure(model, tok, prompt, sampling, ps.name, variants, questions, cfg, cfg.self_control)
        r["variants"] = variants
        (out / (f"si_{ps.name}.json" if len(sets) > 1 else "si.json")).write_text(json.dumps(r, indent=2))
        print(describe(r))
        results.append(r)
        samples += rows
        write_samples(samples, out / "samples.jsonl")  # after every set: a long ranking shows its evidence as it goes
    print(f"samples: {out / 'samples.jsonl'} (every CoT, its question and variant, its scores under every prompt)")
    if len(results) > 1:
        write_table(results, out)
    _log_wandb(cfg, out, results, samples, table=len(results) > 1)
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
