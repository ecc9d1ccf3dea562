"""GRPO step time, per phase, against TRL's GRPOTrainer on the same work.

    python benchmarks/step_time.py                                   # CPU, embedded SmolLM2, G=4, 96 tokens
    python benchmarks/step_time.py --configs grpo,full --steps 5 --warmup 1
    python benchmarks/step_time.py --configs grpo,full --steps 6 --interleave --no-trl  # paired, one process
    python benchmarks/step_time.py --device cuda --dtype bfloat16 --model-shape qwen2.5-0.5b --G 8 \
        --max-new-tokens 256 --prompts 4                             # GPU: a real 0.5B architecture, random weights
    python benchmarks/step_time.py --model-shape qwen2.5-0.5b --tokenizer Qwen/Qwen2.5-0.5B-Instruct \
        --encoder sentence-transformers/all-MiniLM-L6-v2 ...         # other tokenizer / principle encoder

Every measurement runs in its own process (peak RSS is then its own). For each configuration (``grpo``,
``grpo+sami``, ``grpo+ot``, ``full``, ``full_stopgrad`` = ``full`` with ``sami.negatives_grad=false``, and
``full_encoder`` = ``full`` with ``sami.critic=encoder``) it runs ``--warmup`` untimed steps and ``--steps`` timed
ones and prints, per phase (generation, reward scoring, reference forward, policy forward, SAMI's re-scoring, each
loss term, backward, optimiser), the mean wall time and share of the step, completion tokens per second, and peak
memory over the warm-up and timed steps (RSS on CPU, ``torch.cuda.max_memory_allocated`` on GPU), and each timed
step's time. SAMI's re-scoring (every completion under the principle variants that did not produce it) is timed
apart with ``sami.negatives_grad=false`` (a no-grad forward of its own). Exact SAMI runs it in the policy forward
and backward, one batch with GRPO's rows; its line then gives what those two phases take beyond the same
configuration without SAMI (``loss=[grpo,ot]`` for ``full``, else ``loss=grpo``), when that ran too. ``--trl``
(default on) also runs TRL's GRPOTrainer (``pip install 'enigma-lightning[bench]'``) on the same weights, prompts
(rendered by our template, fed to TRL as plain text), reward functions, G, completion length, sampling settings, loss
type and importance-sampling level, and prints the ratio of our ``loss=grpo`` step time to TRL's, step by step, with
its spread.

``--model-shape`` builds a real architecture at random initialisation (no hub needed) and saves it with
``--tokenizer`` (default: the embedded SmolLM2's chat tokenizer, whose 49k tokens fit any of the shapes' vocabularies).
``--encoder`` replaces our principle encoder where a configuration loads one; ``--override KEY=VALUE`` (repeatable)
passes any Hydra override to all our configurations.

``--flops`` (default on) runs one more step in each process, untimed, under torch's FLOP counter (matrix products
and attention), and prints each phase's FLOPs and achieved rate against the fastest square matrix product measured
on the device in the same run, the step time the compute-bound phases (reference forward, policy forward,
backward) would allow at that rate, and the FLOPs of a TRL step against ours. Peak memory is read before that
step.

``--interleave`` runs our configurations in one process instead, their steps in turn (step k of each, in an order
reversed every other step), and prints each step's ratio to ``loss=grpo``'s step k with the median and spread: a
ratio that drift in the machine's speed does not bias. Peak memory is then the process's, of every configuration
together, and is not reported.

Rollouts are fixed-length by default (``--fixed-length``: EOS suppressed until ``--max-new-tokens``) so both
frameworks do exactly the same amount of work; ``--no-fixed-length`` lets completions end at EOS. Activation
checkpointing is off in both by default (the embedded preset's setting; TRL's own default is on);
``--gradient-checkpointing`` turns it on in both (``--checkpoint-every N``: ours checkpoints every N-th layer only,
with ``--no-trl``). Phase times wait for the device (``sync_timings``) on GPU.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

from enigma_lightning.runtime.allocator import MODES as CPU_MALLOC_MODES

CONFIGS = {"grpo": "grpo", "grpo+sami": "[grpo,sami]", "grpo+ot": "[grpo,ot]", "full": "full",
           "full_stopgrad": "full", "full_encoder": "full"}
EXTRA = {"full_stopgrad": ["sami.negatives_grad=false"],  # SAMI's loss value, no gradient through mismatched cells
         "full_encoder": ["sami.critic=encoder"]}  # SAMI's encoder critic: no re-scoring forward
SHAPES = {  # real architectures, random weights (no hub needed)
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                         max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6),
    "llama3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True,
                        max_position_embeddings=131072, rope_theta=5e5, rms_norm_eps=1e-5, head_dim=64),
}
BANDWIDTH_GBS = {"H100": 3350.0, "H200": 4800.0, "A100": 2039.0}  # HBM bandwidth of the SXM parts
TRAINING_PHASES = ("reference", "policy_forward", "sami_prepare", "backward")  # compute-bound (large matrix products)
# exact SAMI re-scores the mismatched cells inside the policy forward and backward (one batch with GRPO's rows); its
# cost is read against the configuration with the same terms but SAMI, where that ran too (else loss=grpo)
WITHOUT_SAMI = {"grpo+sami": ("grpo",), "full": ("grpo+ot", "grpo")}


def flop_counter():
    """torch's ``FlopCounterMode`` (matrix products and attention; elementwise work is not counted), taught two things
    about attention it lacks: the CPU kernels (on CPU ``scaled_dot_product_attention`` runs ``_scaled_dot_product_
    flash_attention_for_cpu``, counted like the GPU kernels: every query against every key, the masked ones included,
    as it runs), and grouped-query attention (with ``enable_gqa`` the GPU kernels get fewer key/value heads than
    query heads, which torch's formula refuses; each query head is counted against its shared key/value head). Matrix
    products with an ``out_dtype`` (bf16 operands accumulated in float32, as TRL's chunked log-probs do on GPU) are
    counted too: torch's formulas take that dtype for their output's shape."""
    import torch
    from torch.utils.flop_counter import (
        FlopCounterMode,
        bmm_flop,
        mm_flop,
        sdpa_backward_flop_count,
        sdpa_flop_count,
    )

    aten = torch.ops.aten

    def heads(query, *kv):  # [B, H, L, E] shapes: key/value heads widened to the query's
        return [(s[0], query[1], *s[2:]) for s in kv]

    def forward(query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_flop_count(query, *heads(query, key, value))

    def backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
        return sdpa_backward_flop_count(grad_out, query, *heads(query, key, value))

    def mm(a, b, *args, out_shape=None, **kwargs):  # also the ``out_dtype`` overloads, which torch's formulas refuse
        return mm_flop(a, b)

    def bmm(a, b, *args, out_shape=None, **kwargs):
        return bmm_flop(a, b)

    def addmm(bias, a, b, *args, out_shape=None, **kwargs):
        return mm_flop(a, b)

    def baddbmm(bias, a, b, *args, out_shape=None, **kwargs):
        return bmm_flop(a, b)

    mapping = {aten.mm: mm, aten.bmm: bmm, aten.addmm: addmm, aten.baddbmm: baddbmm}
    kernels = ["_scaled_dot_product_flash_attention_for_cpu", "_scaled_dot_product_flash_attention",
               "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"]
    for name in kernels:
        if hasattr(aten, name):
            mapping[getattr(aten, name)] = forward
            mapping[getattr(aten, name + "_backward")] = backward
    return FlopCounterMode(display=False, custom_mapping=mapping)


def _peak_memory(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def materialise_model(args) -> str:
    """A model folder both frameworks load: the embedded default, a given folder, or a real shape at random init."""
    if not args.model_shape:
        from enigma_lightning.models.loading import ModelSpec

        return ModelSpec(name_or_path=args.model).resolved_path()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from enigma_lightning.models.loading import ModelSpec

    tokenizer = args.tokenizer or ModelSpec(name_or_path="embedded:smollm2-135m-instruct").resolved_path()
    tag = "" if args.tokenizer is None else "-" + hashlib.sha1(args.tokenizer.encode()).hexdigest()[:8]
    out = Path(tempfile.gettempdir()) / f"enigma-bench-{args.model_shape}{tag}"
    if not (out / "config.json").exists():
        shape = dict(SHAPES[args.model_shape])
        config = AutoConfig.for_model(shape.pop("model_type"), **shape)
        tok = AutoTokenizer.from_pretrained(tokenizer)
        if len(tok) > config.vocab_size:
            raise SystemExit(f"--tokenizer {tokenizer}: {len(tok)} tokens do not fit the {config.vocab_size}-token "
                             f"vocabulary of --model-shape {args.model_shape}; pass a tokenizer of at most that size")
        import torch

        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config).save_pretrained(out)
        tok.save_pretrained(out)  # a chat tokenizer (default: the embedded SmolLM2's, 49k tokens)
    return str(out)


def _prompts(n: int, template, tok, principles: str) -> list[dict]:
    from enigma_lightning.data.bundled import generate

    rows = generate("train")[:n]
    return [{"prompt": template.render(tok, r["source"], principles), "source": r["source"], "target": r["target"]}
            for r in rows]


def _prompt_batches(batches: int, size: int, template, tok, principles: str) -> list[list[dict]]:
    """``batches`` consecutive batches of ``size`` prompt rows (each batch new prompts, as training steps take)."""
    rows = _prompts(batches * size, template, tok, principles)
    return [rows[i * size:(i + 1) * size] for i in range(batches)]


def build_ours(args, config: str):
    """(module, optimiser, batches) for one configuration: every configuration gets the same prompts step by step."""
    import torch
    from hydra import compose, initialize_config_module
    from hydra.utils import instantiate

    from enigma_lightning.commands.train import build_module
    from enigma_lightning.runtime import allocator

    loss = CONFIGS[config]
    overrides = [f"paths.output_dir={tempfile.mkdtemp()}", "model=hf", f"model.name_or_path={args.model_dir}",
                 f"model.dtype={args.dtype}", f"loss={loss}", f"step.num_generations={args.G}",
                 f"data.batch_size={args.prompts * args.G}", f"rollout.max_new_tokens={args.max_new_tokens}",
                 f"rollout.min_new_tokens={args.max_new_tokens if args.fixed_length else 0}",
                 f"rollout.temperature={args.temperature}", f"grpo.loss_type={args.loss_type}",
                 "grpo.importance_sampling_level=sequence", "logger=none", f"seed={args.seed}",
                 f"model.gradient_checkpointing={args.gradient_checkpointing}",
                 f"model.checkpoint_every_n_layers={args.checkpoint_every}", f"cpu_malloc={args.cpu_malloc}",
                 f"rollout.reserve_cache={args.reserve_cache}"]
    overrides += EXTRA.get(config, [])
    if "sami" in loss or loss == "full":
        overrides.append(f"sami.num_variants={min(2, args.G)}")
        if args.encoder:
            overrides.append(f"encoder.name_or_path={args.encoder}")
    else:
        overrides.append("encoder=none")  # nothing reads it; TRL loads no encoder either
    overrides += args.override  # the user's, last: they win
    with initialize_config_module("enigma_lightning.conf", version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    if args.device == "cpu":  # as training does (enigma_lightning.runtime.allocator); TRL's: --trl-cpu-malloc
        allocator.configure(cfg.cpu_malloc)
    torch.manual_seed(args.seed)
    module = build_module(cfg).to(args.device)
    module.sync_timings = True  # per-phase figures are device times on GPU
    opt = module.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    total = args.warmup + args.steps + args.flops
    chunks = _prompt_batches(total, args.prompts, instantiate(cfg.prompt), module.tokenizer, module.principles.text)
    batches = [{"source": [r["source"] for r in c], "target": [r["target"] for r in c]} for c in chunks]
    return module, opt, batches


def ours_step(args, module, opt, batch: dict, i: int, counted: bool = False) -> dict:
    """One training step (rollout, forwards, loss terms, backward, optimiser): its time and phases, or with
    ``counted`` its FLOPs in their place. The module reads its phase clock (``_clock``) at each phase's start and
    end, so a clock that reads the FLOP counter gives each phase's FLOPs instead of its time."""
    import torch

    module._buffer = None
    if getattr(module.engine, "llm", None) is not None:
        module.engine.version = None  # outside a Trainer the step count stays 0: load the weights as every step does
    counter = flop_counter() if counted else nullcontext()
    with counter:
        now = (lambda c=counter: float(c.get_total_flops())) if counted else time.perf_counter
        if counted:
            module._clock = now
        _sync(args.device)
        t0 = now()
        module.forward_backward(batch)  # rollout, forwards, terms and backward (its phase in last_timings)
        _sync(args.device)
        t2 = now()
        torch.nn.utils.clip_grad_norm_(module.trainable_parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(args.device)
        t3 = now()
    if counted:
        del module._clock
    return {"step": t3 - t0, "phases": dict(module.last_timings, optimizer=t3 - t2),
            "tokens": int(module.last_completion_tokens)}


def run_ours(args) -> dict:
    """One configuration in this process: warm-up, timed steps, and with --flops one more step under the counter."""
    module, opt, batches = build_ours(args, args.config)
    steps, flops, peak = [], None, None
    for i, batch in enumerate(batches):
        counted = args.flops and i == len(batches) - 1
        if counted:
            peak = _peak_memory(args.device)  # the timed steps' peak, before the counter's bookkeeping
        step = ours_step(args, module, opt, batch, i, counted)
        if counted:
            flops = step  # FLOPs in place of seconds
        elif i >= args.warmup:
            steps.append(step)
    peak = peak if peak is not None else _peak_memory(args.device)
    return {"steps": steps, "flops": flops, "peak_memory_gib": peak}


def run_interleaved(args) -> dict[str, dict]:
    """``--interleave``: every configuration in this one process, their steps taken in turn (step k of each
    configuration one after the other, the order reversed every other k), so a drift in the machine's speed reaches
    them alike and step k of a configuration pairs with step k of ``loss=grpo``. Peak memory is the process's, of
    all the configurations together, so it is not reported per configuration."""
    configs = args.config.split(",")
    built = {c: build_ours(args, c) for c in configs}
    out = {c: {"steps": [], "flops": None, "peak_memory_gib": None} for c in configs}
    total = args.warmup + args.steps
    for i in range(total):
        for c in (configs if i % 2 == 0 else configs[::-1]):
            module, opt, batches = built[c]
            step = ours_step(args, module, opt, batches[i], i)
            if i >= args.warmup:
                out[c]["steps"].append(step)
    if args.flops:
        for c in configs:
            module, opt, batches = built[c]
            out[c]["flops"] = ours_step(args, module, opt, batches[total], total, counted=True)
    return out


def run_trl(args) -> dict:
    import torch
    import yaml
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from enigma_lightning.data.prompts import PromptTemplate
    from enigma_lightning.rewards import gated_correctness_reward, xml_format_reward
    from enigma_lightning.runtime import allocator

    conf = Path(__file__).resolve().parents[1] / "conf"
    template = PromptTemplate(**{k: v for k, v in yaml.safe_load((conf / "prompt/xml_cot.yaml").read_text()).items()
                                 if k != "_target_"})
    principles = yaml.safe_load((conf / "principles/default.yaml").read_text())["text"]
    tok = AutoTokenizer.from_pretrained(args.model_dir, padding_side="left")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    if args.device == "cpu":
        allocator.configure(args.trl_cpu_malloc)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=dtype)
    total = args.warmup + args.steps + args.flops
    rows = _prompts(args.prompts * total, template, tok, principles)

    # our reward functions; TRL's completions do not include the prompt's assistant prefill, ours do
    def format_reward(prompts, completions, **kw):
        return xml_format_reward(prompts, [template.prefill + c for c in completions], **kw)

    def correctness_reward(prompts, completions, **kw):
        return gated_correctness_reward(prompts, [template.prefill + c for c in completions], **kw)

    times: list[float] = []
    flops: dict = {}

    class Timer(TrainerCallback):
        """Times each step; with --flops the last step is untimed and counted."""

        counter = None
        peak = None  # the timed steps' peak memory, read before the counted step

        def on_step_begin(self, a, state, control, **kw):
            _sync(args.device)
            if args.flops and state.global_step == total - 1:
                self.peak = _peak_memory(args.device)
                self.counter = flop_counter()
                self.counter.__enter__()
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            _sync(args.device)
            if self.counter is not None:
                self.counter.__exit__(None, None, None)
                flops["step"], self.counter = float(self.counter.get_total_flops()), None
            else:
                times.append(time.perf_counter() - self.t0)

    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.prompts * args.G, num_generations=args.G,
        max_completion_length=args.max_new_tokens, temperature=args.temperature, top_p=1.0, top_k=0,
        loss_type=args.loss_type, importance_sampling_level="sequence", epsilon=3e-4, epsilon_high=4e-4, beta=0.0,
        learning_rate=3e-5, adam_beta2=0.99, weight_decay=0.0, lr_scheduler_type="constant", max_grad_norm=1.0,
        max_steps=total, logging_steps=1, report_to="none", save_strategy="no",
        use_cpu=args.device == "cpu", bf16=False, gradient_checkpointing=args.gradient_checkpointing, seed=args.seed, shuffle_dataset=False, disable_tqdm=True,
        generation_kwargs={"min_new_tokens": args.max_new_tokens} if args.fixed_length else None,
        dataloader_num_workers=0)
    trainer = GRPOTrainer(model=model, reward_funcs=[format_reward, correctness_reward], args=config,
                          train_dataset=Dataset.from_list(rows), processing_class=tok, callbacks=[timer := Timer()])
    trainer.train()
    steps = [{"step": t, "phases": {}, "tokens": None} for t in times[args.warmup :]]
    peak = timer.peak if timer.peak is not None else _peak_memory(args.device)
    return {"steps": steps, "flops": flops or None, "peak_memory_gib": peak}


def worker(args) -> None:
    args.model_dir = materialise_model(args)
    run = {"trl": run_trl, "interleaved": run_interleaved}.get(args.framework, run_ours)
    result = run(args)
    print("RESULT " + json.dumps(result))


def _spawn(args, framework: str, config: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--framework", framework, "--config", config]
    for o in args.override:
        cmd += ["--override", o]
    for k in ("model", "model_shape", "tokenizer", "encoder", "device", "dtype", "G", "prompts", "max_new_tokens",
              "temperature", "steps", "warmup", "loss_type", "seed", "cpu_malloc", "trl_cpu_malloc",
              "checkpoint_every"):
        v = getattr(args, k)
        if v is not None:
            cmd += [f"--{k.replace('_', '-')}", str(v)]
    cmd.append("--fixed-length" if args.fixed_length else "--no-fixed-length")
    cmd.append("--gradient-checkpointing" if args.gradient_checkpointing else "--no-gradient-checkpointing")
    cmd.append("--reserve-cache" if args.reserve_cache else "--no-reserve-cache")
    cmd.append("--flops" if args.flops else "--no-flops")
    out = subprocess.run(cmd, capture_output=True, text=True)
    line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
    if out.returncode != 0 or line is None:
        raise SystemExit(f"{framework} {config} failed:\n{out.stderr[-4000:]}")
    return json.loads(line[len("RESULT "):])


def _merge(acc: dict | None, run: dict) -> dict:
    """One configuration's runs so far plus ``run``: every timed step, each run's mean step, the highest peak, the
    first run's FLOP count (every round does the same work)."""
    run = {**run, "round_means": [statistics.mean(s["step"] for s in run["steps"])]}
    if acc is None:
        return run
    peaks = [x for x in (acc["peak_memory_gib"], run["peak_memory_gib"]) if x is not None]  # None: --interleave
    return {"steps": acc["steps"] + run["steps"], "round_means": acc["round_means"] + run["round_means"],
            "peak_memory_gib": max(peaks) if peaks else None,
            "flops": acc.get("flops") or run.get("flops")}


def bandwidth_share(tokens_per_s: float, weight_bytes: int, rows: int, gbs: float) -> tuple[float, float]:
    """(the bandwidth-bound decoding rate in tokens/s, the measured rate's share of it). Each decoding step of a
    batch of ``rows`` sequences streams every weight from memory at least once, so the batch can emit at most
    ``rows * bandwidth / weight bytes`` tokens per second (KV-cache reads only lower the bound)."""
    bound = rows * gbs * 1e9 / weight_bytes
    return bound, tokens_per_s / bound


def _bandwidth_bound(args, result: dict) -> str:
    """Generation tokens/s as a share of the memory-bandwidth limit (GPU only)."""
    if not args.device.startswith("cuda"):
        return ""
    name, gbs = device_bandwidth(args)
    if gbs is None:
        return f"  (no bandwidth figure for {name}; pass --bandwidth-gbs)"
    from enigma_lightning.models.loading import ModelSpec, load_policy

    weights = weight_bytes(load_policy(ModelSpec(name_or_path=materialise_model(args), dtype=args.dtype)))
    rows = args.prompts * args.G
    gen = statistics.mean(s["tokens"] / s["phases"]["generation"] for s in result["steps"])
    bound, share = bandwidth_share(gen, weights, rows, gbs)
    return f"  generation {gen:.0f} tok/s = {100 * share:.1f}% of the bandwidth limit {bound:.0f} tok/s " \
           f"({gbs:.0f} GB/s, {weights / 2**30:.2f} GiB of weights, {rows} rows)"


def device_bandwidth(args) -> tuple[str, float | None]:
    """(the GPU's name, its memory bandwidth in GB/s): ``--bandwidth-gbs``, else ``BANDWIDTH_GBS``'s figure for that
    GPU, else None."""
    import torch

    name = torch.cuda.get_device_name()
    return name, args.bandwidth_gbs or next((v for k, v in BANDWIDTH_GBS.items() if k in name), None)


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def add_model_arguments(p: argparse.ArgumentParser) -> None:
    """``--model``, ``--model-shape`` and ``--tokenizer`` (checked by :func:`check_model_arguments`)."""
    p.add_argument("--model", default="embedded:smollm2-135m-instruct", help="hub id, folder, embedded:..., tiny:llama")
    p.add_argument("--model-shape", default=None, choices=sorted(SHAPES), help="a real architecture, random weights")
    p.add_argument("--tokenizer", default=None,
                   help="with --model-shape: the tokenizer saved beside the random weights (hub id or folder; "
                        "default: the embedded SmolLM2's chat tokenizer)")


def check_model_arguments(args) -> None:
    if args.tokenizer and not args.model_shape:
        raise SystemExit("--tokenizer goes with --model-shape (a model from --model brings its own tokenizer)")


def matmul_baseline(device: str, dtype: str) -> tuple[float, int]:
    """(GFLOP/s, n) of the fastest n x n x n matrix product in ``dtype`` on ``device`` (best of 3 per size): the
    rate the compute-bound phases are compared with."""
    import torch

    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    sizes = (4096, 8192) if device.startswith("cuda") else (512, 1024, 2048) if dtype != "float32" else \
        (1024, 2048, 4096)
    best = (0.0, 0)
    for n in sizes:
        a, b = (torch.randn(n, n, device=device, dtype=dt) for _ in range(2))
        c = a @ b
        for _ in range(3):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            _sync(device)
            best = max(best, (2 * n**3 / (time.perf_counter() - t0) / 1e9, n))
        del a, b, c
    return best


def mean_phases(r: dict) -> dict[str, float]:
    """A configuration's mean time per phase over its timed steps."""
    return {ph: statistics.mean(s["phases"][ph] for s in r["steps"]) for ph in r["steps"][0]["phases"]}


def rescoring_cost(results: dict[str, dict], config: str) -> tuple[str, float, float | None] | None:
    """Exact SAMI's re-scoring (``WITHOUT_SAMI``): (the configuration compared with, the extra seconds of policy
    forward and backward per step, the extra counted FLOPs or None); None if neither comparison ran."""
    base = next((b for b in WITHOUT_SAMI.get(config, ()) if b in results), None)
    if base is None:
        return None
    a, b = results[config], results[base]
    times = [mean_phases(r) for r in (a, b)]
    extra = sum(times[0][ph] - times[1][ph] for ph in ("policy_forward", "backward"))
    extra_flops = None
    if a.get("flops") and b.get("flops"):
        fa, fb = a["flops"]["phases"], b["flops"]["phases"]
        extra_flops = sum(fa[ph] - fb[ph] for ph in ("policy_forward", "backward"))
    return base, extra, extra_flops


def step_at_rate(step: float, times: dict[str, float], flops: dict[str, float], gflops: float) -> float:
    """The step time if each compute-bound phase (``TRAINING_PHASES``) ran its counted FLOPs at ``gflops`` (or at
    its own measured rate where that is faster), every other phase as measured."""
    saved = 0.0
    for ph in TRAINING_PHASES:
        if ph in times and flops.get(ph, 0) > 0:
            saved += times[ph] - min(times[ph], flops[ph] / (gflops * 1e9))
    return step - saved


def compare_engines(args) -> None:
    """``--engines hf,vllm``: loss=grpo with each rollout engine (``rollout/engine=<name>``) in a process of its own;
    each step loads the policy's weights into an engine that has its own copy (vllm), as training does after every
    optimiser step. The first step starts the engine: it is the warm-up."""
    import copy

    check_model_arguments(args)
    engines = args.engines.split(",")
    print(f"model {args.model_shape or args.model} ({args.dtype}, {args.device}), {args.prompts} prompts x G={args.G}, "
          f"{args.max_new_tokens} new tokens{' (fixed length)' if args.fixed_length else ''}, loss=grpo; "
          f"{args.warmup} warm-up + {args.steps} timed steps per engine\n")
    out = {}
    for e in engines:
        a = copy.copy(args)
        a.override, a.flops = [*args.override, f"rollout/engine={e}"], False
        out[e] = _spawn(a, "ours", "grpo")
    base = statistics.mean(s["step"] for s in out[engines[0]]["steps"])
    gen0 = statistics.mean(s["phases"]["generation"] for s in out[engines[0]]["steps"])
    print(f"{'engine':<8} {'step s':>8} {'/ ' + engines[0]:>8} {'generation s':>13} {'gen tok/s':>10} "
          f"{'speed-up':>8} {'weight sync s':>14} {'peak GiB':>9}")
    for e, r in out.items():
        step = statistics.mean(s["step"] for s in r["steps"])
        gen = statistics.mean(s["phases"]["generation"] for s in r["steps"])
        sync = statistics.mean(s["phases"].get("weight_sync", 0.0) for s in r["steps"])
        tokens = statistics.mean(s["tokens"] for s in r["steps"])
        print(f"{e:<8} {step:8.2f} {step / base:7.2f}x {gen:13.2f} {tokens / gen:10.1f} {gen0 / gen:7.2f}x "
              f"{sync:14.3f} {r['peak_memory_gib']:9.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="grpo,grpo+sami,grpo+ot,full")
    add_model_arguments(p)
    p.add_argument("--encoder", default=None,
                   help="our principle encoder where a configuration loads one (hub id, folder, embedded:...; "
                        "default: the preset's, the embedded all-MiniLM-L6-v2)")
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                   help="a Hydra override for our configurations (repeatable), e.g. encoder.name_or_path=DIR")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--prompts", type=int, default=4, help="prompts per step (completions = prompts x G)")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--loss-type", default="grpo", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=1,
                   help="run every configuration's process this many times in turn (steps pooled; ratios by round)")
    p.add_argument("--interleave", action="store_true",
                   help="our configurations in one process, their steps in turn, each step's ratio to loss=grpo's "
                        "(no peak memory per configuration)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fixed-length", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False,
                   help="activation checkpointing in both frameworks (TRL's own default is on; the embedded preset's off)")
    p.add_argument("--checkpoint-every", type=int, default=1,
                   help="with --gradient-checkpointing: our model.checkpoint_every_n_layers (ours only: needs --no-trl)")
    p.add_argument("--cpu-malloc", default="reuse", choices=CPU_MALLOC_MODES,
                   help="our cpu_malloc setting (enigma_lightning.runtime.allocator; training's default is reuse)")
    p.add_argument("--trl-cpu-malloc", default="system", choices=CPU_MALLOC_MODES,
                   help="the same setting for TRL's process (system: glibc's defaults, as TRL runs)")
    p.add_argument("--reserve-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="our rollout.reserve_cache (KV cache written in place while sampling; TRL's grows by torch.cat)")
    p.add_argument("--trl", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--bandwidth-gbs", type=float, default=None)
    p.add_argument("--flops", action=argparse.BooleanOptionalAction, default=True,
                   help="count each phase's FLOPs (matrix products, attention) in one more, untimed step, and "
                        "compare the rates with the fastest matrix product measured on the device")
    p.add_argument("--engines", default=None, metavar="ENGINES",
                   help="compare rollout engines instead (e.g. hf,vllm): loss=grpo with each rollout/engine in its "
                        "own process; step time, completion tok/s, generation and weight-sync time per step")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--framework", default="ours", help=argparse.SUPPRESS)
    p.add_argument("--config", default="grpo", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return

    if args.engines:
        compare_engines(args)
        return
    configs = args.configs.split(",")
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        raise SystemExit(f"--configs: unknown {sorted(unknown)}; choose from {list(CONFIGS)}")
    check_model_arguments(args)
    if args.rounds < 1:
        raise SystemExit(f"--rounds must be >= 1; got {args.rounds}")
    if args.checkpoint_every != 1 and not (args.gradient_checkpointing and not args.trl):
        raise SystemExit("--checkpoint-every N (N > 1) needs --gradient-checkpointing and --no-trl (TRL is always run "
                         "with every layer checkpointed here, so the comparison would not be like for like)")
    print(f"model {args.model_shape or args.model} ({args.dtype}, {args.device}), {args.prompts} prompts x G={args.G}, "
          f"{args.max_new_tokens} new tokens{' (fixed length)' if args.fixed_length else ''}, loss_type "
          f"{args.loss_type}, sequence-level IS, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}"
          + (f" (every {args.checkpoint_every} layers)" if args.checkpoint_every != 1 else "")
          + f", reserve_cache {str(args.reserve_cache).lower()}"
          + (f", cpu_malloc {args.cpu_malloc}" + (f" (TRL: {args.trl_cpu_malloc})" if args.trl else "")
             if args.device == "cpu" else "")
          + f"; {args.warmup} warm-up + {args.steps} timed steps"
          + (" (+ 1 counted step)" if args.flops else "")
          + (f" per process, {args.rounds} rounds" if args.rounds > 1 else "")
          + ("; our configurations in one process, steps in turn\n" if args.interleave else "\n"))
    # Round after round, each configuration (then TRL) runs in a fresh process (with --interleave, all of ours in
    # one, step by step in turn): drift in the machine's speed reaches every configuration alike, and each round
    # gives its own ratio.
    results: dict[str, dict] = {}
    trl = None
    for _ in range(args.rounds):
        runs = _spawn(args, "interleaved", ",".join(configs)) if args.interleave else \
            {c: _spawn(args, "ours", c) for c in configs}
        for c in configs:
            results[c] = _merge(results.get(c), runs[c])
        if args.trl:
            trl = _merge(trl, _spawn(args, "trl", "grpo"))
    base = statistics.mean(s["step"] for s in results["grpo"]["steps"]) if "grpo" in results else None
    rate = None
    if args.flops:
        rate, n = matmul_baseline(args.device, args.dtype)
        print(f"matmul baseline: {rate:.1f} GFLOP/s ({n} x {n} x {n} {args.dtype} product, the fastest of those "
              f"measured); FLOPs below are matrix products and attention, counted in one more step\n")

    floor = {c: step_at_rate(statistics.mean(s["step"] for s in r["steps"]), mean_phases(r), r["flops"]["phases"],
                             rate) for c, r in results.items() if rate and r.get("flops")}
    for c, r in results.items():
        mean_step = statistics.mean(s["step"] for s in r["steps"])
        tokens = statistics.mean(s["tokens"] for s in r["steps"])
        label = " ".join([f"loss={CONFIGS[c]}", *EXTRA.get(c, [])])
        by_round = [a / b for a, b in zip(r["round_means"], results["grpo"]["round_means"], strict=True)] \
            if base and c != "grpo" and args.rounds > 1 else []
        peak = "n/a (--interleave)" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f} GiB"
        print(f"{label}: step {mean_step:.2f} s (sd {statistics.pstdev(s['step'] for s in r['steps']):.2f})"
              f", {tokens / mean_step:.1f} completion tok/s, peak memory {peak}"
              + (f", {mean_step / base:.2f}x loss=grpo" if base and c != "grpo" else "")
              + (" (by round: " + ", ".join(f"{x:.2f}" for x in by_round) + ")" if by_round else ""))
        print("    steps (s)       " + ", ".join(f"{s['step']:.2f}" for s in r["steps"]))
        if args.interleave and base and c != "grpo":  # step k here ran next to loss=grpo's step k
            paired = [a["step"] / b["step"] for a, b in zip(r["steps"], results["grpo"]["steps"], strict=True)]
            print("    / loss=grpo     " + ", ".join(f"{x:.2f}" for x in paired) + f"  (median "
                  f"{statistics.median(paired):.2f}x, min {min(paired):.2f}, max {max(paired):.2f})")
        counted = r["flops"]["phases"] if r.get("flops") else {}
        for ph, t in mean_phases(r).items():
            f = counted.get(ph, 0.0)
            if t == 0.0 and not f:  # a phase this configuration does not have (loss=grpo's reference forward)
                continue
            print(f"    {ph:<15} {t:7.3f} s  {100 * t / mean_step:5.1f}%"
                  + (f"  {f / 1e9:9.2f} GFLOP  {f / t / 1e9:7.1f} GFLOP/s ({100 * f / t / 1e9 / rate:3.0f}% of the "
                     f"baseline)" if f > 0 and rate else ""))
        if (cost := rescoring_cost(results, c)) is not None:
            base_c, extra, extra_flops = cost
            print(f"    sami_rescoring  {extra:7.3f} s  {100 * extra / mean_step:5.1f}%"
                  + (f"  {extra_flops / 1e9:9.2f} GFLOP" if extra_flops is not None else "")
                  + f"  (in policy_forward and backward above, batched with GRPO's rows: their excess over "
                    f"loss={CONFIGS[base_c]}'s)")
        if c in floor:
            f = r["flops"]["step"]
            print(f"    counted: {f / 1e9:.1f} GFLOP per step, {f / mean_step / 1e9:.1f} GFLOP/s over the step; with "
                  f"{', '.join(ph for ph in TRAINING_PHASES if counted.get(ph, 0) > 0)} at the baseline rate: "
                  f"{floor[c]:.2f} s"
                  + (f", {floor[c] / floor['grpo']:.2f}x loss=grpo's" if c != "grpo" and "grpo" in floor else ""))
        if c == "grpo" and (line := _bandwidth_bound(args, r)):
            print(line)
        print()
    if trl is not None and "grpo" in results:
        ours = [s["step"] for s in results["grpo"]["steps"]]
        theirs = [s["step"] for s in trl["steps"]]
        ratios = [a / b for a, b in zip(ours, theirs, strict=False)]
        ours_peak = results["grpo"]["peak_memory_gib"]
        mem = "n/a (--interleave)" if ours_peak is None else f"{ours_peak / trl['peak_memory_gib']:.2f}x"
        print(f"TRL GRPOTrainer: step {statistics.mean(theirs):.2f} s (sd {statistics.pstdev(theirs):.2f}), "
              f"peak memory {trl['peak_memory_gib']:.2f} GiB")
        if trl.get("flops") and results["grpo"].get("flops"):
            f_trl, f_ours = trl["flops"]["step"], results["grpo"]["flops"]["step"]
            print(f"counted FLOPs per step: TRL {f_trl / 1e9:.1f} GFLOP, ours (loss=grpo) {f_ours / 1e9:.1f} GFLOP "
                  f"({f_ours / f_trl:.2f}x)")
        print("ours / TRL, loss=grpo, step by step: " + ", ".join(f"{x:.2f}" for x in ratios))
        print(f"ours / TRL step time: median {statistics.median(ratios):.2f}x (min {min(ratios):.2f}, max "
              f"{max(ratios):.2f}); peak memory {mem}")


if __name__ == "__main__":
    main()
