"""Distributed training on CPU (gloo): two DDP processes give the one-process run's losses and weights; batches
split into whole prompts per rank; per-completion seeds make sampling independent of the batch; sweeps relaunch
DDP children as the job itself."""

import csv

import pytest
import torch
from helpers import sampling

from enigma_lightning.data.datasets import StepBatchSampler

SIGNAL = ["+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
          "allowed_targets=[helpers]"]
# SGD, not Adam: Adam's step is about lr * sign(grad) where a gradient is near zero, so float rounding in the
# gradient (sums in another order on two processes) becomes a step of up to lr there; SGD's step is lr * grad.
OPTIM = ["optim.optimizer._target_=torch.optim.SGD", "~optim.optimizer.betas", "optim.optimizer.lr=0.1"]
COMMON = ["experiment=smoke", "trainer.max_steps=2", "rollout.seed_per_prompt=true", "grpo.loss_type=dapo",
          "trainer.limit_val_batches=0", "callbacks.checkpoint=null", *OPTIM, *SIGNAL]


def test_step_batches_split_whole_prompts_across_ranks():
    one = StepBatchSampler(100, 8, seed=3)
    ranks = [StepBatchSampler(100, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    for step in (0, 1, 11, 12, 30):  # across epoch boundaries too
        assert ranks[0].batch(step) + ranks[1].batch(step) == one.batch(step)


def test_per_completion_seeds_do_not_depend_on_the_batch(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from enigma_lightning.rollout.hf import generate
    from enigma_lightning.rollout.sampling import row_seeds

    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    cfg_sampling = sampling(max_new_tokens=12, temperature=1.0, seed_per_prompt=True)
    prompts = ["What is 2 + 2?", "Name a colour, please, and explain why it is your favourite"]
    both = generate(model, tok, prompts, 3, cfg_sampling, seeds=row_seeds(0, 5, prompts, 3))
    alone = generate(model, tok, prompts[1:], 3, cfg_sampling, seeds=row_seeds(0, 5, prompts[1:], 3))
    assert both.completions[3:] == alone.completions
    assert len(set(both.completions[3:])) > 1  # still random within a group
    other_step = generate(model, tok, prompts[1:], 3, cfg_sampling, seeds=row_seeds(0, 6, prompts[1:], 3))
    assert other_step.completions != alone.completions
    assert row_seeds(0, 5, ["a", "a"], 1)[0] != row_seeds(0, 5, ["a", "a"], 1)[1]  # repeated prompts differ


def test_the_sampler_draws_from_the_softmax_with_or_without_seeds():
    """One draw per row by the inverse CDF: the frequencies match softmax(scores) (the -inf token never comes up),
    seeded rows repeat their draws and differ from one another, and unseeded ones follow torch's global stream."""
    from enigma_lightning.rollout.sampling import InverseCdfSampler

    logits = torch.tensor([[2.0, 1.0, float("-inf"), 0.0, -3.0, float("-inf")]]).repeat(40000, 1)
    probs = torch.softmax(logits[0], -1)
    torch.manual_seed(0)
    for sampler in (InverseCdfSampler(list(range(40000))), InverseCdfSampler()):
        out = sampler(None, logits)
        assert torch.equal(out.max(-1).values, torch.zeros(40000)) and (out == 0).sum() == 40000  # one pick per row
        freq = torch.bincount(out.argmax(-1), minlength=6).double() / 40000
        sigma = (probs * (1 - probs) / 40000).sqrt()
        assert ((freq - probs).abs() <= 5 * sigma + 1e-12).all(), (freq, probs)
        assert freq[2] == 0 and freq[5] == 0 and freq[4] > 0  # a 0.4% token comes up, the filtered ones never
    seeded = [InverseCdfSampler([7, 8])(None, logits[:2]).argmax(-1) for _ in range(2)]
    steps = torch.stack([s(None, logits[:2]).argmax(-1) for s in [InverseCdfSampler([7, 8])] * 50])
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(steps[:, 0], steps[:, 1])
    torch.manual_seed(3)
    a = InverseCdfSampler()(None, logits[:50]).argmax(-1)
    torch.manual_seed(3)
    assert torch.equal(InverseCdfSampler()(None, logits[:50]).argmax(-1), a)
    with pytest.raises(ValueError, match="3 seeds for 2 completions"):
        InverseCdfSampler([1, 2, 3])(None, logits[:2])


def _rows(out):
    with open(out / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_two_process_ddp_equals_one_process_on_the_same_global_batch(tmp_path, tiny_dir):
    from helpers import run_cli
    from safetensors.torch import load_file

    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_cli("enigma_lightning.train", *COMMON, "data.batch_size=16", f"hydra.run.dir={one}")
    r2 = run_cli("enigma_lightning.train", *COMMON, "trainer=ddp_cpu", "data.batch_size=8", f"hydra.run.dir={two}")
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 2
    for ra, rb in zip(a, b, strict=True):
        for key in ("train/loss", "train/reward/mean", "train/completions/mean_length", "train/grpo/clip_ratio"):
            assert float(ra[key]) == pytest.approx(float(rb[key]), rel=1e-4, abs=1e-6), key
    assert abs(float(a[0]["train/loss"])) > 1e-3  # a real loss, not a trivial zero
    wa, wb = load_file(one / "policy/model.safetensors"), load_file(two / "policy/model.safetensors")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    base = load_file(next(iter(tiny_dir.glob("*.safetensors"))))
    assert max((wa[k] - base[k]).abs().max().item() for k in wa) > 1e-4  # and both moved from the base
    assert (two / "checkpoints/last.ckpt").exists()  # written once, by rank 0


def test_ddp_inside_a_sweep_relaunches_the_job_not_the_sweep(tmp_path):
    from helpers import run_cli

    sweep = tmp_path / "sweep"
    r = run_cli("enigma_lightning.train", "--multirun", *COMMON, "trainer=ddp_cpu", "data.batch_size=8", "seed=7",
                f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0"]  # no nested sweep from the children
    assert len(_rows(sweep / "0")) == 2 and (sweep / "report.md").exists()
