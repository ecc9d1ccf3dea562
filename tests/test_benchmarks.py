"""The benchmark scripts run end to end (they print figures; nothing here checks a speed)."""

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "benchmarks" / "step_time.py"


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


def test_step_time_of_the_cheaper_sami_settings_in_rounds():
    """Also with every other layer checkpointed (ours only: a like-for-like TRL run has no such setting)."""
    out = _run("--model", "tiny:llama", "--configs", "grpo,full_stopgrad,full_encoder", "--steps", "1", "--warmup",
               "0", "--max-new-tokens", "8", "--prompts", "2", "--no-trl", "--rounds", "2", "--gradient-checkpointing",
               "--checkpoint-every", "2")
    assert "gradient checkpointing on (every 2 layers)" in out
    for label in ("loss=full sami.negatives_grad=false: step", "loss=full sami.critic=encoder: step"):
        assert label in out, label
    assert "TRL" not in out and "1 timed steps per process, 2 rounds" in out
    for block in out.split("steps (s)")[1:]:  # every configuration: one step from each of the two rounds
        assert len(block.splitlines()[0].split(", ")) == 2
    assert out.count("(by round: ") == 2  # the two SAMI settings, one ratio to loss=grpo per round
    assert all(len(x.split(")")[0].split(", ")) == 2 for x in out.split("(by round: ")[1:])


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
    sys.path.insert(0, str(SCRIPT.parent))
    try:
        from step_time import bandwidth_share
    finally:
        sys.path.remove(str(SCRIPT.parent))
    bound, share = bandwidth_share(2680.0, 10**9, 8, 3350.0)
    assert bound == pytest.approx(26800.0) and share == pytest.approx(0.1)


@pytest.mark.slow
def test_step_time_on_a_real_architecture_at_random_init():
    out = _run("--model-shape", "qwen2.5-0.5b", "--configs", "grpo", "--steps", "1", "--warmup", "0",
               "--max-new-tokens", "4", "--prompts", "1", "--G", "2", timeout=1800)
    assert "model qwen2.5-0.5b" in out and "ours / TRL step time" in out
