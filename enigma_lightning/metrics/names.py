"""Every metric name a run logs, in one table: ``docs/metrics.md`` is generated from it (``python -m
enigma_lightning.metrics.names``; a test checks the file is up to date), and the run summary, the sweep report and the
W&B dashboard name metrics through :func:`metric`, which refuses a name the table does not have.

Names follow ``stage/term/quantity``. ``<...>`` in a name stands for one path segment (a term, a reward function, a
phase, a layer).
"""

from __future__ import annotations

import re
from functools import cache
from pathlib import Path

TABLE: list[tuple[str, str]] = [
    ("train/loss", "the objective: sum over selected terms of `weight * loss`"),
    ("train/grad_norm", "global L2 norm of the trainable parameters' gradient, before clipping (`step.max_grad_norm`)"),
    ("train/<term>/loss", "each selected term's loss (`grpo`, `sami`, `ot`, your own)"),
    ("train/grpo/kl", "mean k3 KL(policy ‖ reference) over completion tokens (times the importance weight when "
     "`grpo.kl_bias_correction`); only when `grpo.beta != 0`"),
    ("train/grpo/clip_ratio", "fraction of completion tokens (token level) or completions (sequence level) whose "
     "importance weight was clipped"),
    ("train/grpo/clip_ratio_low", "the same, below `1 - epsilon` with negative advantage"),
    ("train/grpo/clip_ratio_high", "the same, above `1 + epsilon_high` with positive advantage"),
    ("train/sami/mi_bound", "log K - loss: InfoNCE lower bound on I(CoT; principle | question), nats"),
    ("train/sami/mi_bound_bits", "the same in bits"),
    ("train/sami/si", "mi_bound / log K on the step's matrices (the Sufficiency Index of the current policy)"),
    ("train/sami/acc_row", "top-1 identification: the right CoT for each prompt variant"),
    ("train/sami/acc_col", "top-1 identification: the right variant for each CoT"),
    ("train/ot/divergence", "debiased Sinkhorn divergence between policy and reference hidden states (mean over "
     "`ot.layers`)"),
    ("train/ot/divergence/layer_<i>", "the same per layer, when `ot.layers` has several"),
    ("train/ot/points", "points per cloud after subsampling (the global batch's cloud on several ranks)"),
    ("train/ot/degenerate", "1 when no completion token was left to compare"),
    ("train/reward/mean", "total (weighted) reward over the step's completions"),
    ("train/reward/std", "its standard deviation (unscorable completions ignored)"),
    ("train/reward/<name>/mean", "mean of one reward function (`format`, `correctness`, your own), ignoring `None`"),
    ("train/reward/<name>/logged/<key>", "a scalar a reward function reported with TRL's `log_metric(key, value)` (or "
     "a numeric entry of a verl `compute_score` dict), mean over the step"),
    ("train/reward/nonfinite", "reward values returned NaN or inf this step (`None` is unscorable, not counted); "
     "such a step is not applied (callbacks.guard)"),
    ("train/nonfinite_skipped", "1 on a step whose loss, gradients or rewards were not finite and that was skipped "
     "(callbacks.guard.on_nonfinite=skip)"),
    ("train/reward/frac_zero_std", "fraction of completions in groups whose rewards are all equal (no GRPO signal)"),
    ("train/advantages/abs_mean", "mean absolute advantage"),
    ("train/format/strict_rate", "fraction of completions in the strict XML format (`format` in the progress bar)"),
    ("train/entropy", "per-token entropy of the policy on the completion tokens (nats), estimated as the mean of "
     "`-log p` of the sampled tokens at the sampling temperature (TRL's `entropy` is the exact entropy of the logits; "
     "on a fresh rollout this is its unbiased estimate)"),
    ("train/completions/mean_length", "completion tokens up to and including EOS, mean over the step"),
    ("train/completions/max_length", "the same, maximum"),
    ("train/completions/clipped_ratio", "fraction of completions that hit `rollout.max_new_tokens` without EOS"),
    ("train/rollout/logprob_gap/mean", "`rollout/engine=vllm`: mean over completion tokens of |policy log-prob - "
     "engine log-prob| of the sampled token (the engine that sampled against the policy that trains; ~0 in float32 "
     "with `rollout.top_p=1`, `rollout.top_k=0`)"),
    ("train/rollout/logprob_gap/max", "the same, maximum over the step's tokens"),
    ("train/grpo/rollout_is_weight", "with `grpo.rollout_correction` on: mean truncated importance weight "
     "min(exp(policy - engine log-prob), `grpo.rollout_correction_cap`) over completion tokens"),
    ("train/grpo/rollout_is_clipped", "the same: fraction of completion tokens whose weight hit the cap"),
    ("perf/step_time", "seconds per GRPO step: rollout + forwards + backward + optimiser"),
    ("perf/tokens_per_s", "completion tokens of the step / `perf/step_time`"),
    ("perf/<phase>_time", "seconds of each timed phase: `generation`, `reward` (scoring), `reference` (the no-grad "
     "reference forward), `weight_sync` (`rollout/engine=vllm`: the policy's weights into the engine; the first "
     "step's includes starting it), `policy_forward` (the policy forward with grad; with exact SAMI it also scores every "
     "completion under every variant, in the same batch), `<term>_prepare` (a term's prepare hook: with "
     "`sami.negatives_grad=false`, the no-grad forward over the mismatched cells), `<term>_scored_rows` (a term's "
     "extra rows when they run in a forward of their own), each term's own computation (`grpo`, `sami`, `ot`: "
     "for OT the Sinkhorn solve), and `backward` (with `step.micro_batch_size`: each micro-batch's forward with "
     "gradient and its backward; the `policy_forward` before it then runs without gradient)"),
    ("perf/<phase>_share", "the same as a share of `perf/step_time`"),
    ("val/format_rate", "held-out split, greedy decoding: fraction in the strict format (every "
     "`trainer.val_check_interval` steps)"),
    ("val/accuracy", "held-out split: fraction in the strict format *and* correct"),
    ("val/accuracy_best", "best `val/accuracy` so far (usable as `callbacks.checkpoint.monitor` and as "
     "`optimized_metric`)"),
    ("val/completions/mean_length", "held-out split: mean completion length"),
    ("probe/<measure>/mean", "with `callbacks=probes`, every `callbacks.probes.every_n_steps` steps: a geometry "
     "measure of the policy against its base model (`sinkhorn`, `cka`, `fisher_rao`, `mean_shift`, "
     "`principle_alignment`, `twonn_policy`, `twonn_reference`, `erank_policy`, `erank_reference`; see "
     "`python -m enigma_lightning.probe`), averaged over layers; per-layer values in `probes/step<N>/probe.json`"),
    ("probe/<measure>/last", "the same at the last layer"),
    ("samples/completions", "W&B table of sample completions (prompt, completion, reward, target, and the columns "
     "reward functions pass to TRL's `log_extra`), every `callbacks.samples.every_n_steps` steps and at the last step; also appended to `samples.jsonl`"),
    ("reward", "progress bar only: `train/reward/mean`"),
    ("format", "progress bar only: `train/format/strict_rate`"),
]


@cache
def _patterns() -> list[tuple[str, re.Pattern]]:
    return [(name, re.compile(re.sub(r"<[^>]+>", "[^/]+", re.escape(name).replace(r"\<", "<").replace(r"\>", ">"))
                              + "$")) for name, _ in TABLE]


def documented(name: str) -> bool:
    """Whether ``name`` (a concrete metric, e.g. ``train/reward/format/mean``) is in the table."""
    return any(p.match(name) for _, p in _patterns())


def metric(name: str) -> str:
    """``name``, after checking the table has it: code that reads a metric names it through this."""
    if not documented(name):
        raise KeyError(f"metric {name!r} is not in enigma_lightning.metrics.names.TABLE; add it there (and run "
                       "python -m enigma_lightning.metrics.names to update docs/metrics.md)")
    return name


def markdown_table() -> str:
    rows = [f"| `{n}` | {m.replace('|', chr(92) + '|')} |" for n, m in TABLE]
    return "\n".join(["| name | meaning |", "|---|---|", *rows]) + "\n"


BEGIN, END = "<!-- metrics table: generated by python -m enigma_lightning.metrics.names -->", "<!-- end of table -->"


def render_doc(text: str) -> str:
    """``text`` (docs/metrics.md) with the generated table between its markers."""
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    # blank lines around the table: a table right after a line of HTML (the marker) or a paragraph is not a table
    # to every renderer, and one followed by a non-blank line may swallow it as a row
    return f"{head}{BEGIN}\n\n{markdown_table()}\n{END}{tail}"


def main() -> None:
    path = Path(__file__).resolve().parents[2] / "docs" / "metrics.md"
    path.write_text(render_doc(path.read_text()))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
