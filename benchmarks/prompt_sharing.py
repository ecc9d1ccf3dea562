"""Forward+backward of the GRPO policy pass, three ways: ``plain`` (every (prompt, completion) row whole), ``prompt``
(each distinct prompt once, its KV cache repeated over its G completions) and ``prefix`` (as ``prompt``, and the
opening tokens that the distinct prompts share, system message and worked example, once: what training does).

Each variant runs in its own process so that peak RSS is its own. Prints ms per pass, ratios to ``plain``, and peak
RSS. ``--gradient-checkpointing`` runs all three with activation checkpointing on (the hub presets' setting).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = ("plain", "prompt", "prefix")


def measure(args: argparse.Namespace) -> dict:
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from enigma_lightning.models.loading import ModelSpec, load_policy, load_tokenizer
    from enigma_lightning.rollout.hf import generate
    from enigma_lightning.rollout.logprobs import per_token_logps

    torch.manual_seed(0)
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=["paths.output_dir=/tmp/enigma-bench"])
    spec = ModelSpec(name_or_path=args.model, gradient_checkpointing=args.gradient_checkpointing)
    tok, model = load_tokenizer(spec), load_policy(spec)
    prompt, principles, sampling = instantiate(cfg.prompt), instantiate(cfg.principles), instantiate(cfg.rollout)
    sampling.max_new_tokens = args.max_new_tokens
    rows = [r["source"] for r in __import__("enigma_lightning.data.bundled", fromlist=["x"]).generate("eval")[: args.prompts]]
    ro = generate(model, tok, [prompt.render(tok, q, principles.text) for q in rows], args.g, sampling,
                  prefill=prompt.prefill)
    g = 1 if args.variant == "plain" else args.g
    plan = ro.prefixes if args.variant == "prefix" else ro.prefixes.ungrouped()
    model.train()
    times = []
    for i in range(args.warmup + args.repeats):
        t0 = time.perf_counter()
        logps, _ = per_token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                   sampling.temperature, num_generations=g, prefixes=plan)
        (logps * ro.completion_mask).sum().backward()
        model.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    return {"variant": args.variant, "ms": [1000 * t for t in times],
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "prompt_tokens": int(ro.prompt_ids.size(1)), "completion_tokens": int(ro.completion_ids.size(1)),
            "rows": int(ro.prompt_ids.size(0)), "shared": [len(x) for x in ro.prefixes.prefixes]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--g", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing on in all three variants")
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.variant:
        print(json.dumps(measure(args)))
        return
    results = {}
    for variant in VARIANTS:
        cmd = [sys.executable, __file__, "--variant", variant, *sys.argv[1:]]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        results[variant] = json.loads(out)
    r = results["plain"]
    print(f"model {args.model}: {r['rows']} rows = {args.prompts} prompts x G={args.g}, "
          f"prompt {r['prompt_tokens']} tokens (padded; shared openings: {r['shared']}), completions "
          f"{r['completion_tokens']} tokens (padded), activation checkpointing "
          f"{'on' if args.gradient_checkpointing else 'off'}")
    for v, res in results.items():
        print(f"{v:>7}: fwd+bwd {statistics.median(res['ms']):8.1f} ms (median of {len(res['ms'])}, "
              f"min {min(res['ms']):.1f}, max {max(res['ms']):.1f}), peak RSS {res['peak_rss_mb']:.0f} MB")
    for v in VARIANTS[1:]:
        ratio = statistics.median(results[v]["ms"]) / statistics.median(results["plain"]["ms"])
        mem = results[v]["peak_rss_mb"] / results["plain"]["peak_rss_mb"]
        print(f"{v} / plain: time {ratio:.2f}x, peak RSS {mem:.2f}x")


if __name__ == "__main__":
    main()
