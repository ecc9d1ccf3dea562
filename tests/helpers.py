"""Reward functions for tests: on a random tiny model the format reward is constant, so GRPO would see no signal."""


def length_reward(prompts, completions, **columns):
    """Longer completions score higher (gives non-zero advantages on a random model)."""
    return [len(c) / 100.0 for c in completions]


def digit_reward(prompts, completions, **columns):
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def run_cli(module, *args, timeout=600):
    """Run ``python -m <module> <args>`` in a subprocess, as a user would; returns the CompletedProcess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)
