"""Peak memory and step time against the micro-batch size (``step.micro_batch_size``), and a memory plan for 1B.

    python benchmarks/memory.py                                     # CPU: embedded SmolLM2, loss=grpo and full, mb off / 4
    python benchmarks/memory.py --model-shape llama3.2-1b --layers 2 --dtype bfloat16 --G 2 --prompts 2 \
        --max-new-tokens 64 --micro-batch-sizes 0,2 --steps 1        # CPU: Llama-3.2-1B's width and vocabulary
    python benchmarks/memory.py --device cuda --dtype bfloat16 --model-shape llama3.2-1b --G 16 --prompts 4 \
        --max-new-tokens 1024 --micro-batch-sizes 0,32,16            # GPU: the real layout, random weights
    python benchmarks/memory.py --plan-only                         # the 80 GB table (arithmetic only)

Every (configuration, micro-batch size) runs in its own process (``benchmarks/step_time.py``'s worker: the same
module, prompts and fixed-length rollouts), so each peak is its own: ``torch.cuda.max_memory_allocated`` on GPU, the
process's peak RSS on CPU (which includes loading the model; the ``load only`` line is that part, no step taken).
Micro-batch size 0 is the whole step at once. ``--layers N`` keeps the shape's width and vocabulary with N layers
(a 1B step in 32-bit needs ~25 GB on CPU; per-layer costs scale with the layer count).

Then, unless ``--no-plan``, the arithmetic of :func:`plan`: what one 80 GB GPU holds at G=8 and 16 completions, 512
and 1024 completion tokens, with and without FSDP, for ``--plan-shape``. Those figures are estimates (stated below and
in docs/memory.md), not measurements.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import step_time  # noqa: E402  (benchmarks/: the worker that builds and steps the module)

GIB = 2**30


def _param_count(shape: dict) -> tuple[int, int, int]:
    """(total parameters, one transformer block's, the embeddings + head) of a SHAPES entry."""
    h, i, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    hd = shape.get("head_dim") or h // shape["num_attention_heads"]
    q, kv = shape["num_attention_heads"] * hd, shape["num_key_value_heads"] * hd
    bias = (q + 2 * kv) if shape["model_type"] == "qwen2" else 0
    block = h * q + 2 * h * kv + q * h + bias + 3 * h * i + 2 * h
    embed = v * h * (1 if shape.get("tie_word_embeddings") else 2)
    return embed + L * block + h, block, embed


def act_per_token_layer(h: int, i: int) -> int:
    """Bytes one decoder layer keeps for the backward per token under bf16 autocast, without activation
    checkpointing (an estimate): the fp32 residual stream at the two norms (2 x 4 h), the bf16 inputs of the q/k/v,
    o and MLP projections and the attention output (about 6 x 2 h), and the MLP's gate, up, activation and product
    (4 x 2 i). SDPA/flash attention keeps no s x s matrix. 20 h + 8 i: 106 KB per token per layer at 1B."""
    return 20 * h + 8 * i


def plan(shape: dict, prompts: int, g: int, tokens: int, prompt_tokens: int, gpus: int, micro_prompts: int | None,
         checkpointing: bool = False) -> dict[str, float]:
    """GiB per GPU for one GRPO step of ``prompts`` x ``g`` rows (estimates): fp32 master weights, grads and Adam's
    two moments (16 bytes per trainable parameter), the frozen reference (a copy of the policy: fp32, 4 bytes per
    parameter), activations and logits (10 V bytes per completion token: bf16 logits, their float32 log-softmax and
    its gradient) of ``micro_prompts`` prompts' rows at a time (micro-batches hold whole prompts; all rows when
    None), and generation's KV cache. Under FSDP (``gpus > 1``) weights, grads, optimiser states and the reference
    are divided by ``gpus``, plus one block's and the root's (embeddings, head) weights gathered in flight."""
    n, block, embed = _param_count(shape)
    h, i, v, L = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_hidden_layers"]
    rows = prompts * g
    r = g * (prompts if micro_prompts is None else min(prompts, micro_prompts))
    seq = tokens + prompt_tokens
    per_token = L * 4 * h + act_per_token_layer(h, i) if checkpointing else L * act_per_token_layer(h, i)
    kv_heads = shape["num_key_value_heads"] * (shape.get("head_dim") or h // shape["num_attention_heads"])
    out = {"weights+grads+adam": 16 * n / gpus, "reference": 4 * n / gpus,
           "fsdp_gathered": 4 * (block + embed) if gpus > 1 else 0.0,
           "activations": r * seq * per_token, "logits": r * tokens * 10 * v,
           "kv_cache(generation)": rows * seq * L * 2 * kv_heads * 2}  # no grad, every row, bf16
    static = out["weights+grads+adam"] + out["reference"] + out["fsdp_gathered"]
    # generation and the training forward do not overlap: the step's peak is the larger of the two phases
    peak = max(static + out["activations"] + out["logits"], static + out["kv_cache(generation)"] + rows * 10 * v)
    out = {k: x / GIB for k, x in out.items()}
    out["peak"] = peak / GIB
    return out


def print_plan(shape_name: str, prompt_tokens: int, prompts: int = 4, budget: float = 80.0) -> None:
    shape = step_time.SHAPES[shape_name]
    n, _, _ = _param_count(shape)
    print(f"\nplan (ESTIMATES, not measured): {shape_name}, {n / 1e9:.2f}B parameters, {prompts} prompts of "
          f"{prompt_tokens} tokens x G completions per GPU, bf16-mixed, AdamW, a reference model (not LoRA); "
          f"GiB per GPU, * = over {budget:.0f}")
    print(f"{'G':>3} {'tokens':>6} {'setup':>12} {'whole step':>11} {'mb=G':>8} {'mb=G+ckpt':>10}  most prompts per GPU "
          "(mb=G / mb=G+ckpt)")
    for g in (8, 16):
        for t in (512, 1024):
            for gpus, label in ((1, "1 GPU"), (8, "FSDP 8 GPUs")):
                def peak(p, micro, ckpt=False, g=g, t=t, gpus=gpus):
                    return plan(shape, p, g, t, prompt_tokens, gpus, micro, ckpt)["peak"]

                cells = [peak(prompts, None), peak(prompts, 1), peak(prompts, 1, True)]
                most = [max((p for p in range(1, 1025) if peak(p, 1, c) <= budget), default=0) for c in (False, True)]
                marks = [f"{x:.1f}{'*' if x > budget else ' '}" for x in cells]
                print(f"{g:>3} {t:>6} {label:>12} {marks[0]:>11} {marks[1]:>8} {marks[2]:>10}  {most[0]} / {most[1]}")
    print("(mb=G: step.micro_batch_size=G, one prompt's rows per forward/backward; ckpt: "
          "model.gradient_checkpointing=true)")
    for g, t in ((16, 1024),):
        parts = plan(shape, prompts, g, t, prompt_tokens, 1, None)
        print(f"G={g}, {t} tokens, {prompts} prompts, 1 GPU, whole step: "
              + ", ".join(f"{k} {x:.1f}" for k, x in parts.items()))


def materialise(args) -> str:
    """The model folder: --model, or --model-shape at random init with --layers layers (if given)."""
    if not args.model_shape:
        return step_time.materialise_model(argparse.Namespace(model_shape=None, model=args.model, tokenizer=None))
    if args.layers is None:
        return step_time.materialise_model(argparse.Namespace(model_shape=args.model_shape, model=None,
                                                              tokenizer=args.tokenizer))
    name = f"{args.model_shape}-{args.layers}l"
    step_time.SHAPES[name] = {**step_time.SHAPES[args.model_shape], "num_hidden_layers": args.layers}
    return step_time.materialise_model(argparse.Namespace(model_shape=name, model=None, tokenizer=args.tokenizer))


def measure(args, model_dir: str, config: str, micro: int | None, steps: int) -> dict:
    ns = argparse.Namespace(
        model=model_dir, model_shape=None, tokenizer=None, encoder=None, device=args.device, dtype=args.dtype, G=args.G,
        prompts=args.prompts, max_new_tokens=args.max_new_tokens, temperature=0.9, steps=steps, warmup=0,
        loss_type="grpo", seed=0, cpu_malloc="reuse", trl_cpu_malloc=None, checkpoint_every=1, fixed_length=True,
        gradient_checkpointing=args.gradient_checkpointing, reserve_cache=True, flops=False,
        override=[*args.override, f"step.micro_batch_size={micro if micro else 'null'}"])
    return step_time._spawn(ns, "ours", config)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", default="grpo,full")
    p.add_argument("--model", default="embedded:smollm2-135m-instruct")
    p.add_argument("--model-shape", default=None, choices=sorted(step_time.SHAPES))
    p.add_argument("--layers", type=int, default=None, help="with --model-shape: this many layers")
    p.add_argument("--tokenizer", default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--G", type=int, default=4)
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--micro-batch-sizes", default="0,4",
                   help="rows per forward/backward, comma-separated; 0: the whole step at once (micro-batches hold "
                        "whole prompts: a size below G runs G rows)")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--override", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--plan", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--plan-only", action="store_true")
    p.add_argument("--plan-shape", default="llama3.2-1b", choices=sorted(step_time.SHAPES))
    p.add_argument("--plan-prompt-tokens", type=int, default=256)
    p.add_argument("--json", default=None, help="also write the measurements to this file")
    args = p.parse_args()
    if not args.plan_only:
        model_dir = materialise(args)
        rows = args.G * args.prompts
        unit = "max_memory_allocated" if args.device.startswith("cuda") else "peak RSS"
        print(f"model {args.model_shape or args.model}{f' ({args.layers} layers)' if args.layers else ''}, "
              f"{args.device} {args.dtype}, {args.prompts} prompts x G={args.G} = {rows} rows x "
              f"{args.max_new_tokens} tokens, {args.steps} steps per process; peak memory = {unit}")
        results = []
        load = measure(args, model_dir, "grpo", None, 0)
        print(f"load only (no step): {load['peak_memory_gib']:.2f} GiB")
        for config in args.configs.split(","):
            for mb in (int(x) for x in args.micro_batch_sizes.split(",")):
                if mb and mb >= rows:
                    continue
                r = measure(args, model_dir, config, mb or None, args.steps)
                step = sum(s["step"] for s in r["steps"]) / len(r["steps"])
                label = f"micro_batch_size={mb}" if mb else "whole step"
                print(f"loss={config:<5} {label:<20} peak {r['peak_memory_gib']:6.2f} GiB   step {step:7.2f} s")
                results.append({"config": config, "micro_batch_size": mb or None, "peak_gib": r["peak_memory_gib"],
                                "step_s": step})
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "load_gib": load["peak_memory_gib"],
                                                   "results": results}, indent=2))
    if args.plan or args.plan_only:
        print_plan(args.plan_shape, args.plan_prompt_tokens)


if __name__ == "__main__":
    main()
