"""The vLLM rollout engine on vLLM's CPU build (``nox -s vllm``; these tests need vLLM, ``pytest -m vllm``): the same
rollout as the ``hf`` engine, greedy agreement with it, weight sync after an optimiser step (plain and LoRA), seeded
reproducibility, the log-prob gap, a training run that resumes, and clear errors for bad settings."""

import csv
import json

import pytest
import torch
from helpers import configured, sampling

pytestmark = pytest.mark.vllm

QUESTIONS = ["What is 12 + 30?", "Name the largest planet of the solar system.", "Is 17 a prime number?",
             "Spell the word 'cat' backwards."]


@pytest.fixture(scope="module")
def embedded():
    from enigma_lightning.models.loading import load_policy, load_tokenizer

    spec = configured("model")
    return load_policy(spec), load_tokenizer(spec)


@pytest.fixture(scope="module")
def engine():
    eng = configured("rollout", "rollout/engine=vllm").engine
    yield eng
    eng.close()


def prompts(tok, questions=QUESTIONS):
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            for q in questions]


def cfg(**kw):
    return sampling(**{"max_new_tokens": 40, **kw})


def test_same_rollout_as_hf_and_greedy_agreement(embedded, engine):
    from enigma_lightning.rollout.hf import generate

    model, tok = embedded
    s = cfg()
    ps = prompts(tok)
    a = engine.generate(model, tok, ps, 1, s, prefill="<reasoning>", greedy=True, version=0)
    b = generate(model, tok, ps, 1, s, prefill="<reasoning>", greedy=True)
    for f in ("prompt_ids", "prompt_mask"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    assert a.completion_ids.dtype == b.completion_ids.dtype and a.completion_mask.dtype == b.completion_mask.dtype
    assert a.truncated.dtype == b.truncated.dtype == torch.bool
    assert a.prefixes is not None and a.sampling_logps.shape == a.completion_ids.shape
    # greedy decoding of the embedded model: the same tokens, the same masks, the same texts
    assert a.completion_ids.shape == b.completion_ids.shape
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.completion_mask, b.completion_mask) and torch.equal(a.truncated, b.truncated)
    assert a.completions == b.completions and all(c.startswith("<reasoning>") for c in a.completions)


def test_sampling_is_seeded_and_logprobs_match_the_policy(embedded, engine):
    from enigma_lightning.metrics.rollout import logprob_gap
    from enigma_lightning.rollout.logprobs import per_token_logps

    model, tok = embedded
    s = cfg()
    ps = prompts(tok)[:2]
    seeds = [1000 + i for i in range(8)]
    a = engine.generate(model, tok, ps, 4, s, seeds=seeds, version=0)
    b = engine.generate(model, tok, ps, 4, s, seeds=seeds, version=0)
    c = engine.generate(model, tok, ps, 4, s, seeds=[7 * i + 99 for i in range(8)], version=0)
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert not torch.equal(a.completion_ids[:, :8], c.completion_ids[:, :8])
    assert a.completion_ids.shape[0] == 8 and len(set(map(tuple, a.completion_ids.tolist()))) > 1  # G distinct samples
    # the engine's log-probs of its samples against the policy's forward (float32, top_p = 1, top_k = 0)
    with torch.no_grad():
        policy, _ = per_token_logps(model, a.prompt_ids, a.prompt_mask, a.completion_ids, a.completion_mask,
                                    temperature=s.temperature)
    gap = logprob_gap(policy, a.sampling_logps, a.completion_mask)
    assert gap["train/rollout/logprob_gap/max"] < 2e-3, gap
    assert gap["train/rollout/logprob_gap/mean"] < 2e-4, gap


def _step(model, tok, ps, lr):
    """One optimiser step that moves greedy decoding: raise the log-likelihood of a fixed answer."""
    target = tok(" Banana banana banana.", add_special_tokens=False, return_tensors="pt")["input_ids"]
    enc = tok(ps[:1], return_tensors="pt", add_special_tokens=False)
    ids = torch.cat([enc["input_ids"], target], 1)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(3):
        logits = model(ids).logits[:, enc["input_ids"].size(1) - 1 : -1]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_weights_follow_the_policy_after_an_optimiser_step(embedded, engine):
    import copy

    from enigma_lightning.rollout.hf import generate

    model, tok = embedded
    model = copy.deepcopy(model)
    s = cfg(max_new_tokens=24)
    ps = prompts(tok)
    before = engine.generate(model, tok, ps, 1, s, greedy=True, version=0)
    _step(model, tok, ps, lr=0.5)
    stale = engine.generate(model, tok, ps, 1, s, greedy=True, version=0)  # same version: weights not reloaded
    assert torch.equal(stale.completion_ids, before.completion_ids)
    after = engine.generate(model, tok, ps, 1, s, greedy=True, version=1)
    assert engine.last_sync_seconds > 0
    updated = generate(model, tok, ps, 1, s, greedy=True)
    assert not torch.equal(updated.completion_ids[:, :8], before.completion_ids[:, :8])  # the step moved decoding
    assert torch.equal(after.completion_ids, updated.completion_ids)
    assert after.completions == updated.completions


def test_lora_policy_reaches_the_engine_as_merged_weights(embedded, engine):
    import copy

    from peft import LoraConfig, get_peft_model

    from enigma_lightning.rollout.hf import generate
    from enigma_lightning.rollout.vllm import checkpoint_weights

    model, tok = embedded
    base_names = set(model.state_dict())
    peft_model = get_peft_model(copy.deepcopy(model), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    s = cfg(max_new_tokens=24)
    ps = prompts(tok)
    _step(peft_model, tok, ps, lr=2.0)  # only the adapter trains
    weights = dict(checkpoint_weights(peft_model))
    assert set(weights) == base_names  # checkpoint names, no lora_* tensors
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(weights[q], model.state_dict()[q])  # the adapter's delta is in the merged weight
    after = engine.generate(peft_model, tok, ps, 1, s, greedy=True, version=2)
    updated = generate(peft_model, tok, ps, 1, s, greedy=True)
    base = generate(model, tok, ps, 1, s, greedy=True)
    assert not torch.equal(updated.completion_ids[:, :8], base.completion_ids[:, :8])
    assert torch.equal(after.completion_ids, updated.completion_ids)
    # the policy is not modified by the sync (no merge in place)
    assert not any(getattr(m, "merged", False) for m in peft_model.modules())


def test_kv_cache_too_small_names_the_key(embedded):
    from enigma_lightning.rollout.vllm import EngineError

    model, tok = embedded
    eng = configured("rollout", "rollout/engine=vllm", "rollout.engine.kv_cache_gib=0.0001").engine
    with pytest.raises(EngineError, match=r"rollout\.engine\.kv_cache_gib"):
        eng.generate(model, tok, prompts(tok)[:1], 1, cfg(), greedy=True)
    eng.close()


# the smoke model has head_dim 16, which vLLM's CPU attention does not take; this one has 64
HEAD_64 = ["model.tiny.hidden_size=128", "model.tiny.num_heads=2"]


def test_model_the_engine_cannot_run_gets_a_clear_error(make_cfg):
    from enigma_lightning.commands.train import run
    from enigma_lightning.rollout.vllm import EngineError

    with pytest.raises(EngineError, match=r"rollout/engine=hf"):
        run(make_cfg("experiment=smoke", "rollout/engine=vllm", "rollout.engine.kv_cache_gib=0.25",
                     "trainer.max_steps=1"))


def _metrics(out):
    with open(out / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("train/loss")]


def test_training_run_logs_and_resumes(make_cfg, tmp_path):
    """A few-step run with rollout.engine=vllm trains and logs the gap and the sync time; a run interrupted after
    step 2 and resumed from its checkpoint ends where the uninterrupted run ends."""
    from enigma_lightning.commands.train import run

    common = ["experiment=smoke", *HEAD_64, "rollout/engine=vllm", "rollout.engine.kv_cache_gib=0.25", "trainer.max_steps=4",
              "trainer.limit_val_batches=1", "trainer.val_check_interval=4", "data.batch_size=4",
              "+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
              "allowed_targets=[helpers]"]
    full = tmp_path / "full"
    summary = run(make_cfg(*common, out=full))
    assert summary["status"] == "finished" and summary["global_step"] == 4
    rows = _metrics(full)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3]
    for r in rows:
        assert float(r["train/rollout/logprob_gap/max"]) < 1e-3
        assert float(r["perf/weight_sync_time"]) > 0
    assert "val/format_rate" in summary["final"]
    samples = [json.loads(x) for x in (full / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["completion"] for s in samples)

    part = tmp_path / "part"
    run(make_cfg(*common, "trainer.max_steps=2", out=part))
    resumed = tmp_path / "resumed"
    run(make_cfg(*common, f"ckpt_path={part / 'checkpoints/last.ckpt'}", out=resumed))
    a = torch.load(full / "checkpoints/last.ckpt", weights_only=False)
    b = torch.load(resumed / "checkpoints/last.ckpt", weights_only=False)
    assert a["global_step"] == b["global_step"] == 4
    for k, v in a["state_dict"].items():
        torch.testing.assert_close(b["state_dict"][k], v, rtol=1e-5, atol=1e-6)
    last_full, last_resumed = _metrics(full)[-1], _metrics(resumed)[-1]
    assert last_full["train/completions/mean_length"] == last_resumed["train/completions/mean_length"]
    assert float(last_full["train/loss"]) == pytest.approx(float(last_resumed["train/loss"]), abs=1e-6)


def _bench(script, *args):
    import subprocess
    import sys
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / script
    r = subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout[-2000:]
    return r.stdout


def test_benchmarks_compare_the_engines():
    """The benchmark scripts run with the engine (they print figures; nothing here checks a speed)."""
    out = _bench("generation.py", "--variants", "ours,vllm", "--prompts", "2", "--G", "2", "--short", "2", "--long",
                 "6", "--repeats", "1", "--prompt-sets", "1")
    row = next(line for line in out.splitlines() if line.startswith("vllm "))
    assert float(row.split()[1]) > 0 and "(the engine's own)" in row
    assert "vllm: loading the policy's weights into the engine" in out
    out = _bench("step_time.py", "--engines", "hf,vllm", "--steps", "1", "--warmup", "1", "--max-new-tokens", "6",
                 "--prompts", "2", "--G", "2")
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.startswith(("hf ", "vllm "))}
    assert set(rows) == {"hf", "vllm"}
    assert float(rows["hf"][6]) == 0.0 and float(rows["vllm"][6]) > 0  # weight sync: vllm only


def test_ddp_each_rank_runs_its_own_engine(tmp_path):
    """trainer=ddp_cpu: two processes, each with its engine (vLLM's external launcher mode), train and log."""
    from helpers import run_cli

    out = tmp_path / "ddp"
    r = run_cli("enigma_lightning.train", "experiment=smoke", *HEAD_64, "trainer=ddp_cpu", "rollout.engine=vllm",
                "rollout.engine.kv_cache_gib=0.25", "trainer.max_steps=2", "trainer.limit_val_batches=0",
                f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    rows = _metrics(out)
    assert [int(x["step"]) for x in rows] == [0, 1]
    assert all(float(x["train/rollout/logprob_gap/max"]) < 1e-3 and float(x["perf/weight_sync_time"]) > 0
               for x in rows)
