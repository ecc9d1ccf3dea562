"""Sampling speed per decoding step: our rollout (``enigma_lightning.rollout.hf.generate``) against transformers' plain
``generate`` called as TRL's GRPOTrainer calls it, and our rollout with each of its options changed in turn.

    python benchmarks/generation.py                                # CPU: embedded SmolLM2, 4 prompts x G=4
    python benchmarks/generation.py --model tiny:llama --long 32
    python benchmarks/generation.py --device cuda --dtype bfloat16 --model-shape qwen2.5-0.5b --G 8 --long 256 \\
        --profile /tmp/gen-profile                                 # GPU: a real 0.5B architecture, random weights
    python benchmarks/generation.py --device cuda --dtype bfloat16 --model-shape qwen2.5-0.5b --G 8 --long 256 \\
        --variants hf,ours --sdpa default,flash,efficient,cudnn   # the same with each attention backend in turn

Variants: ``hf`` (the prompts left-padded and repeated G times, ``model.generate`` sampling with a growing KV cache),
``ours`` (the rollout as training runs it: each distinct prompt and shared opening prefilled once, the KV cache
written in place), ``ours_no_reserve`` (``rollout.reserve_cache=false``), ``ours_no_share``
(``rollout.share_prompts=false``), ``ours_seeded`` (``rollout.seed_per_prompt=true``: one random stream per
completion) and ``ours_exact_reserve`` (the in-place KV buffer sized exactly to each batch, not rounded up to
``kvcache.ReservedLayer.granularity`` tokens). Each run samples the next of ``--prompt-sets`` sets of prompts, as
training samples new prompts at every step (attention kernels that cache a plan per shape, cuDNN's, then meet new
shapes as they do in training; ``--prompt-sets 1`` repeats the same prompts).
Each generates fixed-length completions (EOS suppressed) of ``--short`` and of ``--long`` tokens,
``--repeats`` times, the variants in turn within each repeat (the order reversed every other repeat). A decoding
step's time is the difference of the two median times over the difference in tokens: the prompts' prefill drops
out. Also per decoding step, from one more pair of runs: the operators dispatched (a device-independent measure of
launch overhead) and, on GPU, the host-device synchronisations (``torch.cuda.set_sync_debug_mode``), and the time
the weights take to stream from memory once (the floor of a decoding step). ``--profile DIR`` writes a
``torch.profiler`` table (self host and self device time per operator) of one ``--long`` run of each variant to
``DIR/<variant>.txt`` (``DIR/<variant>.<backend>.txt`` with ``--sdpa``).

Attention: the table names the kernel(s) ``scaled_dot_product_attention`` dispatched to in each variant's decoding
steps (``flash``, ``efficient``, ``cudnn``, ``math``, ...: the backend torch chose for those shapes, strides and
masks). ``--sdpa flash,cudnn,...`` runs each variant again with torch's choice restricted to one backend
(``torch.nn.attention.sdpa_kernel``), as ``<variant>@<backend>``; a backend that cannot run the variant's attention
on the device is reported and left out.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_time import (  # noqa: E402
    _prompt_batches,
    _sync,
    add_model_arguments,
    check_model_arguments,
    device_bandwidth,
    materialise_model,
    weight_bytes,
)

OPTIONS = {"ours": {}, "ours_no_reserve": {"reserve_cache": False}, "ours_no_share": {"share_prompts": False},
           "ours_seeded": {"seed_per_prompt": True},
           "ours_exact_reserve": {"granularity": 1}}  # the in-place KV buffer sized exactly (kvcache.ReservedLayer)
VARIANTS = ("hf", *OPTIONS)
ENGINES = ("vllm",)  # rollout engines other than the policy's own generate (--variants hf,ours,vllm); not by default
# --sdpa: torch's own choice, or one torch.nn.attention.SDPBackend
SDPA = {"default": None, "flash": "FLASH_ATTENTION", "efficient": "EFFICIENT_ATTENTION", "cudnn": "CUDNN_ATTENTION",
        "math": "MATH"}
# the operators scaled_dot_product_attention dispatches to, by backend; the math backend is a composite that reaches
# the dispatcher as its parts, of which _safe_softmax is the one nothing else in a decoding step calls
KERNELS = {"_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash",
           "_scaled_dot_product_efficient_attention": "efficient", "_scaled_dot_product_cudnn_attention": "cudnn",
           "_scaled_dot_product_fused_attention_overrideable": "fused", "_safe_softmax": "math"}


def setup(args):
    """(tokenizer, model, prompts, sampling settings, assistant prefill), as training renders and samples them."""
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from enigma_lightning.models.loading import ModelSpec, load_policy, load_tokenizer

    spec = ModelSpec(name_or_path=materialise_model(args), dtype=args.dtype)
    torch.manual_seed(args.seed)
    tok, model = load_tokenizer(spec), load_policy(spec).to(args.device).eval()
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tempfile.mkdtemp()}"])
    template = instantiate(cfg.prompt)
    sets = [[r["prompt"] for r in batch] for batch in
            _prompt_batches(args.prompt_sets, args.prompts, template, tok, instantiate(cfg.principles).text)]
    sampling = replace(instantiate(cfg.rollout), temperature=args.temperature)
    return tok, model, sets, sampling, template.prefill


def runner(variant: str, args, tok, model, prompt_sets, sampling, prefill):
    """A function of n that samples G fixed-length completions of n tokens per prompt the variant's way, each call
    for the next of ``prompt_sets`` (in turn), as training samples new prompts at every step."""
    import itertools
    from unittest.mock import patch

    import torch

    from enigma_lightning.models.compat import ReservedLayer
    from enigma_lightning.rollout.batch import eos_token_ids
    from enigma_lightning.rollout.hf import generate
    from enigma_lightning.rollout.sampling import row_seeds

    batches = itertools.cycle(prompt_sets)
    if variant == "vllm":  # the vLLM engine as training runs it (rollout/engine=vllm), weights loaded once
        engine = vllm_engine(args)

        def run(n: int):
            prompts = next(batches)
            s = replace(sampling, max_new_tokens=n, min_new_tokens=n)
            return engine.generate(model, tok, prompts, args.G, s, prefill=prefill,
                                   seeds=row_seeds(args.seed, 0, prompts, args.G))
        run.engine = engine
        return run
    if variant == "hf":  # as TRL: every row its whole left-padded prompt, transformers' sampling and cache
        eos = eos_token_ids(tok, model)

        def run(n: int):
            enc = tok(next(batches), return_tensors="pt", padding=True, add_special_tokens=False)
            ids = enc["input_ids"].repeat_interleave(args.G, 0).to(args.device)
            mask = enc["attention_mask"].repeat_interleave(args.G, 0).to(args.device)
            with torch.no_grad():
                return model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=args.temperature,
                                      top_p=1.0, top_k=0, max_new_tokens=n, min_new_tokens=n, eos_token_id=eos,
                                      pad_token_id=tok.pad_token_id, use_cache=True)
        return run

    def run(n: int):
        prompts = next(batches)
        options = dict(OPTIONS[variant])
        granularity = options.pop("granularity", ReservedLayer.granularity)
        s = replace(sampling, max_new_tokens=n, min_new_tokens=n, **options)
        seeds = row_seeds(args.seed, 0, prompts, args.G) if s.seed_per_prompt else None
        with patch.object(ReservedLayer, "granularity", granularity):
            return generate(model, tok, prompts, args.G, s, prefill=prefill, seeds=seeds)
    return run


def vllm_engine(args):
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.output_dir={tempfile.mkdtemp()}", "rollout/engine=vllm",
                                          *args.engine_override])
    return instantiate(cfg.rollout.engine)


def sync_seconds(run, model, tok, sampling, times: int = 3) -> list[float]:
    """Seconds to load the policy's weights into the engine (as after every optimiser step), ``times`` times."""
    return [run.engine.sync(model, tok, sampling, version=v) for v in range(1, times + 1)]


def restricted(run, backend: str):
    """``run`` with scaled_dot_product_attention restricted to ``backend`` (``default``: torch's own choice)."""
    if SDPA[backend] is None:
        return run
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = getattr(SDPBackend, SDPA[backend])

    def run_restricted(n: int):
        with sdpa_kernel(chosen):
            return run(n)
    return run_restricted


def timed(run, n: int, device: str) -> float:
    _sync(device)
    t0 = time.perf_counter()
    run(n)
    _sync(device)
    return time.perf_counter() - t0


def dispatched(run, n: int) -> Counter:
    """Operators dispatched while sampling n tokens, by name."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = Counter()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops[func.overloadpacket.__name__] += 1
            return func(*args, **(kwargs or {}))

    with Count() as c:
        run(n)
    return c.ops


def attention_kernels(ops: Counter) -> str:
    """The attention backends among dispatched operators (per-step counts), e.g. ``flash:30``; ``-`` for none."""
    found = Counter()
    for name, count in ops.items():
        if name in KERNELS:
            found[KERNELS[name]] += count
    return ",".join(f"{k}:{v:g}" for k, v in sorted(found.items())) or "-"


def synchronisations(run, n: int) -> int:
    """Host-device synchronisations while sampling n tokens (CUDA's sync debug mode warns at each)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run(n)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def profile_name(variant: str) -> str:
    """``ours@flash`` -> ``ours.flash.txt`` (file names without ``@``)."""
    return variant.replace("@", ".") + ".txt"


def profile(run, n: int, device: str, path: Path) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device.startswith("cuda")
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        run(n)
        _sync(device)
    table = prof.key_averages()
    path.write_text("by self host time\n" + table.table(sort_by="self_cpu_time_total", row_limit=30)
                    + ("\nby self device time\n" + table.table(sort_by="self_device_time_total", row_limit=30)
                       if cuda else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_model_arguments(p)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--short", type=int, default=8, help="tokens of the short run (prefill + a few steps)")
    p.add_argument("--long", type=int, default=96, help="tokens of the long run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-sets", type=int, default=8,
                   help="sets of --prompts prompts each variant's runs take in turn (1: the same prompts every run)")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"from {','.join(VARIANTS + ENGINES)}; vllm: the rollout engine rollout/engine=vllm (needs "
                        "vLLM; README \"Inference engine\")")
    p.add_argument("--engine-override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for the vllm variant's engine (repeatable), e.g. rollout.engine.kv_cache_gib=4")
    p.add_argument("--sdpa", default="default", metavar="BACKENDS",
                   help=f"attention backends to run each variant with, from {','.join(SDPA)} (default: torch's "
                        "choice only)")
    p.add_argument("--bandwidth-gbs", type=float, default=None)
    p.add_argument("--profile", type=Path, default=None, metavar="DIR",
                   help="write a torch.profiler table of one --long run of each variant to DIR/<variant>.txt")
    args = p.parse_args()
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS) - set(ENGINES)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {list(VARIANTS + ENGINES)}")
    backends = args.sdpa.split(",")
    unknown = set(backends) - set(SDPA)
    if unknown:
        raise SystemExit(f"--sdpa: unknown {sorted(unknown)}; choose from {list(SDPA)}")
    if args.prompt_sets < 1:
        raise SystemExit(f"--prompt-sets must be at least 1; got {args.prompt_sets}")
    if not 0 < args.short < args.long:
        raise SystemExit(f"need 0 < --short < --long; got --short {args.short}, --long {args.long}")
    check_model_arguments(args)

    tok, model, prompt_sets, sampling, prefill = setup(args)
    base_runs = {v: runner(v, args, tok, model, prompt_sets, sampling, prefill) for v in variants}
    runs = {v if SDPA[b] is None else f"{v}@{b}": restricted(base_runs[v], b) for b in backends for v in variants}
    rows, steps = args.prompts * args.G, args.long - args.short
    print(f"model {args.model_shape or args.model} ({args.dtype}, {args.device}), {args.prompts} prompts x G={args.G} "
          f"({rows} rows), fixed-length completions of {args.short} and {args.long} tokens, {args.repeats} repeats, "
          f"variants in turn, {args.prompt_sets} prompt set(s) taken in turn\n")
    for v in list(runs):  # warm-up: kernels, allocator, caches
        try:
            runs[v](args.short)
        except RuntimeError as e:  # a restricted backend that cannot run these shapes or masks on this device
            if "@" not in v:
                raise
            print(f"{v}: left out, the backend cannot run this attention here ({str(e).splitlines()[0]})")
            del runs[v]
    variants = list(runs)
    times: dict[str, dict[int, list[float]]] = {v: {args.short: [], args.long: []} for v in variants}
    for r in range(args.repeats):
        for v in variants if r % 2 == 0 else variants[::-1]:
            for n in (args.short, args.long):
                times[v][n].append(timed(runs[v], n, args.device))
    cuda = args.device.startswith("cuda")
    result = {}
    for v in variants:
        short, long = (statistics.median(times[v][n]) for n in (args.short, args.long))
        if v.split("@")[0] in ENGINES:  # its kernels are not torch operators dispatched here: not counted
            result[v] = dict(step=(long - short) / steps, short=short, long=long, ops=float("nan"), syncs=None,
                             attention="(the engine's own)")
            continue
        ops = dispatched(runs[v], args.long)
        ops.subtract(dispatched(runs[v], args.short))
        per_step = Counter({k: c / steps for k, c in ops.items() if c})
        syncs = (synchronisations(runs[v], args.long) - synchronisations(runs[v], args.short)) / steps if cuda else None
        result[v] = dict(step=(long - short) / steps, short=short, long=long, ops=sum(per_step.values()),
                         syncs=syncs, attention=attention_kernels(per_step))
    base = result.get("hf", {}).get("step")
    width = max(16, *(len(v) + 1 for v in result))
    print(f"{'variant':<{width}} {'ms/step':>8} {'/ hf':>6} {'ops/step':>9} {'syncs/step':>10} "
          f"{f'{args.short} tokens':>11} {f'{args.long} tokens':>11} {'tok/s':>8}  attention/step")
    for v, r in result.items():
        ratio = f"{r['step'] / base:.2f}x" if base else "-"
        syncs = "-" if r["syncs"] is None else f"{r['syncs']:.1f}"
        print(f"{v:<{width}} {1e3 * r['step']:8.2f} {ratio:>6} {r['ops']:9.0f} {syncs:>10} {r['short']:10.2f}s "
              f"{r['long']:10.2f}s {rows * args.long / r['long']:8.0f}  {r['attention']}")
    for v in variants:
        if getattr(runs[v], "engine", None) is not None:
            s = sync_seconds(runs[v], model, tok, sampling)
            print(f"\n{v}: loading the policy's weights into the engine (after every optimiser step in training): "
                  + ", ".join(f"{x:.2f}" for x in s) + f" s (mean {statistics.mean(s):.2f} s)")
    if cuda:
        name, gbs = device_bandwidth(args)
        weights = weight_bytes(model)
        print(f"\nfloor of a decoding step: {weights / 2**30:.2f} GiB of weights at {gbs:.0f} GB/s = "
              f"{1e3 * weights / (gbs * 1e9):.2f} ms" if gbs else f"\n(no bandwidth figure for {name}; pass "
              "--bandwidth-gbs)")
    if args.profile:  # last, so that the table above is out whatever the profiler does
        sys.stdout.flush()
        args.profile.mkdir(parents=True, exist_ok=True)
        variants = [v for v in variants if v.split("@")[0] not in ENGINES]
        for v in variants:
            profile(runs[v], args.long, args.device, args.profile / profile_name(v))
        print(f"\nprofiles: {', '.join(str(args.profile / profile_name(v)) for v in variants)}")


if __name__ == "__main__":
    main()
