"""The benchmark scripts run end to end (they print figures; nothing here checks a speed)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "step_time.py"


def _step_time_module():
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import step_time
    finally:
        sys.path.remove(str(SCRIPT.parent))
    return step_time


def _run(*args, timeout=900):
    r = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return r.stdout


def test_step_time_against_trl_on_the_tiny_model():
    out = _run("--model", "tiny:llama", "--configs", "grpo,full", "--steps", "2", "--warmup", "0",
               "--max-new-tokens", "8", "--prompts", "2")
    for phase in ("generation", "reward", "policy_forward", "backward", "optimizer", "ot", "sami"):
        assert f"    {phase}" in out, phase
    assert "loss=full: step" in out and "x loss=grpo" in out
    assert "ours / TRL, loss=grpo, step by step: " in out and "peak memory" in out
    assert len(out.split("step by step: ")[1].splitlines()[0].split(", ")) == 2  # one ratio per timed step
    assert len(out.split("steps (s)")[1].splitlines()[0].split(", ")) == 2  # one time per timed step
    # FLOPs, counted in one more step: every compute phase has a count and a rate, and the backward costs more
    # than the forward (about twice for matrix products; less here, where the prompts' share is large: the last of
    # the tiny model's 2 layers computes nothing from the prompt tokens that the loss reads)
    assert "(+ 1 counted step)" in out and "matmul baseline: " in out and "counted FLOPs per step: TRL " in out
    for block in out.split("\nloss=")[1:3]:  # loss=grpo, loss=full
        gflop = {line.split()[0]: float(line.split("%")[1].split("GFLOP")[0])
                 for line in block.splitlines() if "GFLOP/s (" in line}
        assert {"generation", "policy_forward", "backward"} <= set(gflop), block
        assert 1.3 < gflop["backward"] / gflop["policy_forward"] < 2.6, block
        assert "    counted: " in block and "at the baseline rate: " in block
    full = out.split("loss=full: step")[1]  # the OT term's reference forward, counted too
    assert any(line.startswith("    reference") and "GFLOP/s" in line for line in full.splitlines())
    # exact SAMI's re-scoring: what the policy forward and backward take beyond loss=grpo's (twice the rows: more)
    rescoring = next(line for line in full.splitlines() if line.startswith("    sami_rescoring"))
    assert "excess over loss=grpo's" in rescoring and float(rescoring.split("%")[1].split("GFLOP")[0]) > 0
    assert "    sami_rescoring" not in out.split("loss=full: step")[0]
    assert "    reference" not in out.split("loss=full: step")[0]  # loss=grpo runs no reference forward


def test_step_time_of_the_cheaper_sami_settings_in_rounds():
    """Also with every other layer checkpointed (ours only: a like-for-like TRL run has no such setting)."""
    out = _run("--model", "tiny:llama", "--configs", "grpo,full_stopgrad,full_encoder", "--steps", "1", "--warmup",
               "0", "--max-new-tokens", "8", "--prompts", "2", "--no-trl", "--rounds", "2", "--gradient-checkpointing",
               "--checkpoint-every", "2", "--no-flops")
    assert "gradient checkpointing on (every 2 layers)" in out
    assert "GFLOP" not in out and "counted step" not in out
    for label in ("loss=full sami.negatives_grad=false: step", "loss=full sami.critic=encoder: step"):
        assert label in out, label
    stopgrad, encoder = (out.split(label)[1].split("\nloss=")[0] for label in (
        "sami.negatives_grad=false: step", "sami.critic=encoder: step"))
    assert "    sami_prepare " in stopgrad and "excess" not in stopgrad  # timed apart: its own forward
    assert "    sami_rescoring" not in encoder  # the encoder critic re-scores nothing
    assert "TRL" not in out and "1 timed steps per process, 2 rounds" in out
    for block in out.split("steps (s)")[1:]:  # every configuration: one step from each of the two rounds
        assert len(block.splitlines()[0].split(", ")) == 2
    assert out.count("(by round: ") == 2  # the two SAMI settings, one ratio to loss=grpo per round
    assert all(len(x.split(")")[0].split(", ")) == 2 for x in out.split("(by round: ")[1:])


def test_step_time_interleaved_pairs_each_step_with_loss_grpo():
    out = _run("--model", "tiny:llama", "--configs", "grpo,full", "--steps", "3", "--warmup", "0",
               "--max-new-tokens", "8", "--prompts", "2", "--no-trl", "--no-flops", "--interleave")
    assert "; our configurations in one process, steps in turn" in out
    assert out.count("peak memory n/a (--interleave)") == 2
    full = out.split("loss=full: step")[1]
    steps = [float(x) for x in full.split("steps (s)")[1].splitlines()[0].split(", ")]
    paired = full.split("/ loss=grpo")[1].splitlines()[0]
    assert len(steps) == 3 and len(paired.split("(median")[0].split(", ")) == 3
    assert "/ loss=grpo" not in out.split("loss=full: step")[0]  # no ratio of loss=grpo to itself


def test_interleaved_steps_take_turns(monkeypatch):
    """Step k of every configuration runs before step k + 1 of any, in an order reversed every other step; the
    counted steps come last; warm-up steps are run but not kept."""
    import argparse

    step_time = _step_time_module()
    calls = []
    monkeypatch.setattr(step_time, "build_ours", lambda args, c: (c, None, list(range(args.warmup + args.steps + 1))))
    monkeypatch.setattr(step_time, "ours_step", lambda args, module, opt, batch, i, counted=False: (
        calls.append((module, batch, counted)) or {"step": float(len(calls)), "phases": {}, "tokens": 1}))
    args = argparse.Namespace(config="grpo,full,full_stopgrad", warmup=1, steps=2, flops=True)
    out = step_time.run_interleaved(args)
    order = [c for c, _, _ in calls]
    assert order == ["grpo", "full", "full_stopgrad", "full_stopgrad", "full", "grpo",
                     "grpo", "full", "full_stopgrad", "grpo", "full", "full_stopgrad"]
    assert [b for _, b, _ in calls] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert [k for _, _, k in calls] == [False] * 9 + [True] * 3
    assert [s["step"] for s in out["full"]["steps"]] == [5.0, 8.0]  # steps 1 and 2; step 0 was the warm-up
    assert out["grpo"]["flops"]["step"] == 10.0 and out["full"]["peak_memory_gib"] is None
    merged = step_time._merge(step_time._merge(None, out["full"]), out["full"])  # --rounds: no peak to take
    assert merged["peak_memory_gib"] is None and merged["round_means"] == [6.5, 6.5]


def test_step_time_refuses_partial_checkpointing_against_trl():
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny:llama", "--gradient-checkpointing",
                        "--checkpoint-every", "2"], capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "--checkpoint-every N (N > 1) needs --gradient-checkpointing and --no-trl" in r.stderr


@pytest.mark.parametrize("checkpointing", [False, True])
def test_prompt_sharing_benchmark_on_the_tiny_model(checkpointing):
    script = SCRIPT.parent / "prompt_sharing.py"
    flag = "--gradient-checkpointing" if checkpointing else "--no-gradient-checkpointing"
    r = subprocess.run([sys.executable, str(script), "--model", "tiny:llama", "--warmup", "0", "--repeats", "1",
                        "--max-new-tokens", "8", flag], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"activation checkpointing {'on' if checkpointing else 'off'}" in r.stdout
    for line in ("  plain: fwd+bwd", " prompt: fwd+bwd", " prefix: fwd+bwd", "prompt / plain: time",
                 "prefix / plain: time"):
        assert line in r.stdout, line
    shared = r.stdout.split("shared openings: [")[1].split("]")[0]
    assert int(shared) > 50  # the system message and worked example: one opening, shared by the 4 prompts


def test_bandwidth_bound_of_decoding():
    """The GPU report's arithmetic: 0.5B bf16 weights (1 GB) at 3350 GB/s bound 8 rows to 26,800 tokens/s."""
    bound, share = _step_time_module().bandwidth_share(2680.0, 10**9, 8, 3350.0)
    assert bound == pytest.approx(26800.0) and share == pytest.approx(0.1)


@pytest.mark.slow
def test_step_time_on_a_real_architecture_at_random_init():
    out = _run("--model-shape", "qwen2.5-0.5b", "--configs", "grpo", "--steps", "1", "--warmup", "0",
               "--max-new-tokens", "4", "--prompts", "1", "--G", "2", timeout=1800)
    assert "model qwen2.5-0.5b" in out and "ours / TRL step time" in out


def test_flop_counter_counts_matrix_products_and_cpu_attention():
    """The counts the FLOP figures rest on: a linear layer is 2 M K N forward and twice that backward; CPU attention
    (which torch's own counter does not know) is 4 B H Lq Lk D forward and 2.5 times that backward."""
    import torch

    step_time = _step_time_module()
    lin = torch.nn.Linear(32, 48, bias=False)
    x = torch.randn(5, 32, requires_grad=True)
    with step_time.flop_counter() as c:
        lin(x).sum().backward()
    assert c.get_total_flops() == 3 * 2 * 5 * 32 * 48
    b, h, lq, lk, d = 2, 3, 7, 11, 16
    q = torch.randn(b, h, lq, d, requires_grad=True)
    k, v = (torch.randn(b, h, lk, d, requires_grad=True) for _ in range(2))
    mask = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    with step_time.flop_counter() as c:
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert c.get_total_flops() == 4 * b * h * lq * lk * d
    with step_time.flop_counter() as c:
        out.sum().backward()
    assert c.get_total_flops() == 10 * b * h * lq * lk * d


def test_step_at_the_baseline_rate():
    """Only the compute-bound phases are re-timed, and none becomes slower than measured."""
    step_time = _step_time_module()
    times = {"generation": 10.0, "reference": 2.0, "policy_forward": 3.0, "backward": 6.0, "optimizer": 1.0}
    flops = {"generation": 1e12, "reference": 1e11, "policy_forward": 2e11, "backward": 8e11}
    # at 100 GFLOP/s: reference 1 s (from 2), policy forward 2 s (from 3), backward stays 6 s (8 s at that rate)
    assert step_time.step_at_rate(22.0, times, flops, 100.0) == pytest.approx(20.0)
    assert step_time.step_at_rate(22.0, times, {}, 100.0) == 22.0
    # rounds: every timed step pooled, the first round's count kept
    runs = [{"steps": [{"step": t}], "flops": {"step": f}, "peak_memory_gib": m} for t, f, m in ((1.0, 5.0, 2.0),
                                                                                              (3.0, 6.0, 1.0))]
    merged = step_time._merge(step_time._merge(None, runs[0]), runs[1])
    assert merged["flops"] == {"step": 5.0} and merged["round_means"] == [1.0, 3.0] and merged["peak_memory_gib"] == 2.0


def test_flop_counter_counts_grouped_query_attention_per_query_head():
    """With ``enable_gqa`` the GPU kernels get 2 key/value heads for 8 query heads: counted as 8 heads, not refused."""
    import torch

    step_time = _step_time_module()
    registry = step_time.flop_counter().flop_registry
    b, hq, hkv, lq, lk, d = 2, 8, 2, 5, 7, 16
    q, g = torch.empty(b, hq, lq, d, device="meta"), torch.empty(b, hq, lq, d, device="meta")
    kv = torch.empty(b, hkv, lk, d, device="meta")
    for name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        op = getattr(torch.ops.aten, name)
        assert registry[op](q, kv, kv) == 4 * b * hq * lq * lk * d, name
        assert registry[getattr(torch.ops.aten, name + "_backward")](g, q, kv, kv) == 10 * b * hq * lq * lk * d, name


def test_flop_counter_counts_matrix_products_with_an_output_dtype():
    """``torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)`` (bf16 operands, float32 sums) reaches the counter
    with the dtype as a fourth argument: counted as the product it is."""
    import torch

    step_time = _step_time_module()
    registry = step_time.flop_counter().flop_registry
    aten, f32 = torch.ops.aten, torch.float32
    a, b, acc = (torch.empty(*s, device="meta") for s in ((4, 5), (5, 6), (4, 6)))
    ba, bb, bacc = (torch.empty(*s, device="meta") for s in ((3, 4, 5), (3, 5, 6), (3, 4, 6)))
    assert registry[aten.addmm](acc, a, b, f32, out_val=acc) == 2 * 4 * 5 * 6
    assert registry[aten.mm](a, b, f32, out_val=acc) == 2 * 4 * 5 * 6
    assert registry[aten.baddbmm](bacc, ba, bb, f32, out_val=bacc) == 2 * 3 * 4 * 5 * 6
    assert registry[aten.bmm](ba, bb, f32, out_val=bacc) == 2 * 3 * 4 * 5 * 6


def test_model_shape_takes_a_tokenizer_that_fits_its_vocabulary(monkeypatch, tmp_path):
    """``--tokenizer`` is saved beside the random weights; one larger than the shape's vocabulary is refused."""
    import argparse
    import tempfile

    from transformers import AutoTokenizer

    from enigma_lightning.models.loading import ModelSpec

    step_time = _step_time_module()
    tok_dir = ModelSpec(name_or_path="tiny:llama").resolved_path()
    size = len(AutoTokenizer.from_pretrained(tok_dir))
    shape = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1)
    monkeypatch.setitem(step_time.SHAPES, "small", {**shape, "vocab_size": size - 1})
    monkeypatch.setitem(step_time.SHAPES, "fits", {**shape, "vocab_size": size + 8})
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(SystemExit, match=f"--tokenizer {tok_dir}: {size} tokens do not fit the {size - 1}-token"):
        step_time.materialise_model(argparse.Namespace(model_shape="small", tokenizer=tok_dir, model=None))
    out = step_time.materialise_model(argparse.Namespace(model_shape="fits", tokenizer=tok_dir, model=None))
    assert Path(out).parent == tmp_path and (Path(out) / "config.json").exists()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(tok_dir).get_vocab()


def test_step_time_passes_encoder_and_overrides_to_our_configurations():
    """``--encoder`` reaches the configurations that load one (a missing folder fails loading it, naming it);
    ``--override`` reaches every configuration (an unknown key fails composing)."""
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny:llama", "--configs", "grpo,full", "--no-trl",
                        "--encoder", "/nonexistent/encoder-dir"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ours full failed" in r.stderr and "/nonexistent/encoder-dir" in r.stderr
    r = subprocess.run([sys.executable, str(SCRIPT), "--model", "tiny:llama", "--configs", "grpo", "--no-trl",
                        "--override", "rollout.no_such_key=1"], capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "ours grpo failed" in r.stderr and "no_such_key" in r.stderr


def test_generation_benchmark_on_the_tiny_model(tmp_path):
    script = SCRIPT.parent / "generation.py"
    r = subprocess.run([sys.executable, str(script), "--model", "tiny:llama", "--short", "2", "--long", "6",
                        "--repeats", "1", "--prompts", "2", "--G", "2", "--profile", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = r.stdout.split("\nvariant ")[1].splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip() and not line.startswith("profiles")}
    assert set(rows) == {"hf", "ours", "ours_no_reserve", "ours_no_share", "ours_seeded", "ours_exact_reserve"}
    # times are printed, not checked (on a loaded machine a 4-token difference can even come out negative);
    # operators per decoding step are counted, so they are checked
    assert rows["hf"][2] == "1.00x"
    assert all(not math.isnan(float(row[1])) and float(row[3]) > 50 for row in rows.values())
    for v in rows:
        assert "by self host time" in (tmp_path / f"{v}.txt").read_text()


def test_generation_benchmark_names_the_attention_kernel_and_restricts_it(tmp_path):
    """Each variant's decoding steps name the attention kernel torch dispatched to; ``--sdpa`` reruns the variants
    with one backend only, and a backend the device lacks (cuDNN on CPU) is reported and left out."""
    script = SCRIPT.parent / "generation.py"
    r = subprocess.run([sys.executable, str(script), "--model", "tiny:llama", "--short", "2", "--long", "5",
                        "--repeats", "1", "--prompts", "2", "--G", "2", "--variants", "hf,ours",
                        "--sdpa", "default,math,cudnn", "--profile", str(tmp_path)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hf@cudnn: left out, the backend cannot run this attention here" in r.stdout
    assert "ours@cudnn: left out" in r.stdout
    lines = r.stdout.split("\nvariant ")[1].splitlines()
    assert lines[0].split()[-1] == "attention/step"
    rows = {line.split()[0]: line.split() for line in lines[1:] if line.strip() and not line.startswith("profiles")}
    assert set(rows) == {"hf", "ours", "hf@math", "ours@math"}
    layers = 2  # the tiny model's: one attention call per layer per decoding step
    assert rows["hf@math"][-1] == rows["ours@math"][-1] == f"math:{layers}"
    chosen = {rows["hf"][-1], rows["ours"][-1]}  # torch's own choice on CPU: its flash kernel, not the math one
    assert chosen == {f"flash:{layers}"}, chosen
    for name in ("hf.txt", "ours.txt", "hf.math.txt", "ours.math.txt"):
        assert "by self host time" in (tmp_path / name).read_text()


def test_memory_benchmark_on_the_tiny_model(tmp_path):
    """Peak memory and step time per (loss, micro-batch size), each in its own process, then the 80 GB plan."""
    import json

    script = SCRIPT.parent / "memory.py"
    r = subprocess.run([sys.executable, str(script), "--model", "tiny:llama", "--configs", "grpo,full", "--G", "2",
                        "--prompts", "2", "--max-new-tokens", "8", "--steps", "1", "--micro-batch-sizes", "0,2",
                        "--json", str(tmp_path / "m.json")], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "load only (no step): " in r.stdout and "peak memory = peak RSS" in r.stdout
    for line in ("loss=grpo  whole step", "loss=grpo  micro_batch_size=2", "loss=full  whole step",
                 "loss=full  micro_batch_size=2"):
        assert line in r.stdout, line
    results = json.loads((tmp_path / "m.json").read_text())["results"]
    assert len(results) == 4 and all(x["peak_gib"] > 0 and x["step_s"] > 0 for x in results)
    assert "plan (ESTIMATES, not measured): llama3.2-1b, 1.24B parameters" in r.stdout
    assert r.stdout.count("FSDP 8 GPUs") == 4 and r.stdout.count("1 GPU") >= 4


def test_memory_plan_arithmetic():
    """The plan's terms: 16 bytes of weights, grads and Adam per parameter, divided by the GPUs under FSDP; logits
    10 V bytes per completion token; micro-batches of whole prompts bound activations and logits, not the rest."""
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        import memory
    finally:
        sys.path.remove(str(SCRIPT.parent))
    shape = memory.step_time.SHAPES["llama3.2-1b"]
    n, block, embed = memory._param_count(shape)
    assert 1.23e9 < n < 1.24e9 and embed == 128256 * 2048  # Llama-3.2-1B: 1.236B, tied embeddings
    one = memory.plan(shape, 4, 8, 512, 256, 1, None)
    fsdp = memory.plan(shape, 4, 8, 512, 256, 8, None)
    assert one["weights+grads+adam"] == pytest.approx(16 * n / 2**30)
    assert fsdp["weights+grads+adam"] == pytest.approx(one["weights+grads+adam"] / 8)
    assert one["logits"] == pytest.approx(32 * 512 * 10 * 128256 / 2**30)
    micro = memory.plan(shape, 4, 8, 512, 256, 1, 1)
    assert micro["logits"] == pytest.approx(one["logits"] / 4) and micro["activations"] == pytest.approx(
        one["activations"] / 4)
    assert micro["weights+grads+adam"] == one["weights+grads+adam"] and micro["peak"] < one["peak"]
