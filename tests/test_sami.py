"""SAMI: the symmetric InfoNCE loss and metrics, the K-variant rollout, both critics, and the `si` command."""

import json
import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from helpers import run_cli
from hydra.utils import instantiate

from enigma_lightning.commands.si import summarize
from enigma_lightning.metrics.infonce import infonce_metrics, symmetric_infonce
from enigma_lightning.rollout.logprobs import per_token_logps


def sami_loss_by_hand(s):
    """SAMI's published loss, written independently: per matrix, (CE(rows) + CE(columns)) / 2, diagonal targets."""
    total = 0.0
    for m in s:
        k = m.size(0)
        row = sum(-(m[i, i] - torch.logsumexp(m[i], 0)) for i in range(k)) / k
        col = F.cross_entropy(m.T, torch.arange(k))
        total += (row + col) / 2
    return total / s.size(0)


@pytest.mark.parametrize("k", [2, 3, 5])
def test_loss_equals_sami_formula(k):
    s = torch.randn(7, k, k) * 3
    torch.testing.assert_close(symmetric_infonce(s), sami_loss_by_hand(s))


def test_mi_bound_never_exceeds_log_k():
    g = torch.Generator().manual_seed(0)
    for k in (2, 4, 8):
        for scale in (0.1, 1, 10, 1000):
            m = infonce_metrics(torch.randn(16, k, k, generator=g) * scale)
            assert m["mi_bound"] <= math.log(k) + 1e-6
    m = infonce_metrics(100 * torch.eye(4).expand(3, 4, 4))
    assert m["mi_bound"] == pytest.approx(math.log(4), abs=1e-6)


def test_si_is_one_for_identifying_and_zero_for_uniform():
    perfect = summarize(50 * torch.eye(3).expand(10, 3, 3).clone(), bootstrap=50)
    assert perfect["si"] == pytest.approx(1.0, abs=1e-6) and perfect["acc_row"] == perfect["acc_col"] == 1.0
    uniform = summarize(torch.zeros(10, 3, 3), bootstrap=50)
    assert uniform["si"] == pytest.approx(0.0, abs=1e-6)
    noisy = summarize(torch.eye(2) + 0.8 * torch.randn(40, 2, 2), bootstrap=200)
    assert noisy["si_ci_low"] <= noisy["si"] <= noisy["si_ci_high"]
    swapped = infonce_metrics(torch.tensor([[[0.0, 5.0], [5.0, 0.0]]]))
    assert swapped["acc_row"] == 0.0 and swapped["si"] < 0  # anti-identifying: below zero


def _module(make_cfg, *overrides):
    from enigma_lightning.commands.train import build_module

    cfg = make_cfg("experiment=smoke", *overrides)
    return build_module(cfg), cfg


def _scores(module, step):
    """SAMI's scores [Q, i' (prompt variant), i (completion variant), r] from the term's matrices [Q * m, K, K]."""
    k, m = step.layout.num_variants, step.layout.per_variant
    return module.terms["sami"].matrices(step).view(-1, m, k, k).permute(0, 2, 3, 1)


def test_rollout_under_k_variants_and_logprob_matrix_equals_slow_scoring(make_cfg):
    module, cfg = _module(make_cfg, "loss=[grpo,sami]", "step.num_generations=4", "sami.num_variants=2")
    assert module.variants == [module.principles.text, module.principles.antithesis] and module.per_prompt == 2
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    buf = module._new_rollout(batch)
    ro = buf["ro"]
    q, k, m, g = len(batch["source"]), 2, 2, 4
    assert ro.prompt_ids.size(0) == q * g
    prompts = module.render(batch["source"], module.variants)
    assert module.principles.antithesis.strip().splitlines()[0] in prompts[1]  # (question 0, variant 1)
    with torch.no_grad():
        step = module.step_batch(buf, {})
        logps, scores = step.logps, _scores(module, step)
        plain, _ = per_token_logps(module.policy, ro.prompt_ids, ro.prompt_mask, ro.completion_ids,
                                   ro.completion_mask, module.sampling.temperature)
    mask = ro.completion_mask.bool()
    torch.testing.assert_close(logps[mask], plain[mask], rtol=1e-4, atol=1e-5)  # diagonal rows serve GRPO
    with torch.no_grad():
        for qi in range(q):
            for ip in range(k):  # prompt variant
                for i in range(k):  # completion's variant
                    for r in range(m):
                        p_row, c_row = qi * g + ip * m, qi * g + i * m + r
                        lp, _ = per_token_logps(module.policy, ro.prompt_ids[p_row : p_row + 1],
                                                ro.prompt_mask[p_row : p_row + 1], ro.completion_ids[c_row : c_row + 1],
                                                ro.completion_mask[c_row : c_row + 1], module.sampling.temperature)
                        cm = ro.completion_mask[c_row].float()
                        expected = (lp[0] * cm).sum() / cm.sum()
                        assert scores[qi, ip, i, r].item() == pytest.approx(expected.item(), abs=1e-4)


def test_stop_gradient_negatives_same_scores_gradient_only_through_matched_cells(make_cfg):
    module, cfg = _module(make_cfg, "loss=[grpo,sami]", "step.num_generations=4", "sami.num_variants=2")
    dm = instantiate(cfg.data)
    dm.setup()
    buf = module._new_rollout(next(iter(dm.train_dataloader())))
    timings = {}
    step = module.step_batch(buf, timings)
    logps, exact = step.logps, _scores(module, step)
    assert set(timings) == {"policy_forward"}  # exact: the re-scoring is part of the policy forward, not timed apart
    module.terms["sami"].negatives_grad = False
    module.forwards.overwrite_logits = False  # two backward passes below
    timings = {}
    step = module.step_batch(buf, timings)
    logps_sg, scores = step.logps, _scores(module, step)
    assert set(timings) == {"policy_forward", "sami_prepare"} and timings["sami_prepare"] > 0  # its own no-grad forward
    torch.testing.assert_close(scores, exact, rtol=1e-4, atol=1e-5)  # the same loss value
    torch.testing.assert_close(logps_sg, logps, rtol=1e-4, atol=1e-5)
    own = torch.eye(2, dtype=torch.bool)[None, :, :, None].expand_as(scores)  # [Q, i', i, r]: i' == i
    scores[~own].sum().backward(retain_graph=True)  # negatives only: no gradient reaches the policy
    assert all(p.grad is None or not p.grad.any() for p in module.policy.parameters())
    scores[own].sum().backward()
    assert any(p.grad is not None and p.grad.any() for p in module.policy.parameters())


def test_encoder_critic_trains_projection_and_nothing_frozen(make_cfg, tmp_path):
    module, cfg = _module(make_cfg, "loss=[grpo,sami]", "sami.critic=encoder")
    proj0 = module.terms["sami"].projection.weight.detach().clone()
    enc0 = {k: v.clone() for k, v in module.encoder.state_dict().items()}
    trainable = {id(p) for p in module.trainable_parameters()}
    assert id(module.terms["sami"].projection.weight) in trainable
    assert not any(id(p) in trainable for p in module.encoder.parameters())
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(module, datamodule=instantiate(cfg.data))
    assert not torch.equal(module.terms["sami"].projection.weight, proj0)
    assert all(torch.equal(v, enc0[k]) for k, v in module.encoder.state_dict().items())
    assert 0 <= trainer.callback_metrics["train/sami/acc_row"] <= 1
    ckpt_keys = module.state_dict().keys()
    assert "terms.sami.projection.weight" in ckpt_keys


@pytest.mark.parametrize("loss", ["[grpo,sami]", "full"])
def test_sami_losses_compose_and_train(make_cfg, tmp_path, loss):
    from enigma_lightning.commands.train import run

    summary = run(make_cfg("experiment=smoke", f"loss={loss}", out=tmp_path / "run"))
    final = summary["final"]
    for key in ("train/sami/loss", "train/sami/mi_bound", "train/sami/acc_row", "train/sami/acc_col"):
        assert key in final, key
    assert final["train/sami/mi_bound"] <= math.log(2) + 1e-6
    if loss == "full":
        assert "train/ot/divergence" in final


def test_sami_config_errors(make_cfg):
    from enigma_lightning.runtime.validate import config_problems

    problems = config_problems(make_cfg("loss=[grpo,sami]", "sami.num_variants=3", "principles=default"))
    assert problems == ["sami.num_variants=3 but principles=default has 2 variants (text, antithesis, variants). "
                        "Set sami.num_variants=2 or add principles.variants"]
    problems = config_problems(make_cfg("loss=[grpo,sami]", "sami.num_variants=3", "principles=high_si"))
    assert problems == ["step.num_generations=4 must be a multiple of sami.num_variants=3 (each variant gets G / K "
                        "completions). Set step.num_generations=3"]


def test_si_command_offline_on_tiny_model(tmp_path):
    out = tmp_path / "si"
    r = run_cli("enigma_lightning.si", "model=tiny", "sets=[high_si,low_si]", "num_questions=4",
                "rollout.max_new_tokens=8", "bootstrap=50", "wandb_mode=offline", f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("si_table.md", "si_table.csv", "si_bar.png", "si_high_si.json", "si_low_si.json"):
        assert (out / name).exists(), name
    res = json.loads((out / "si_high_si.json").read_text())
    assert res["num_questions"] == 4 and res["num_variants"] == 2 and res["mi_bound"] <= math.log(2) + 1e-6
    assert list((out / "wandb").glob("offline-run-*"))


def test_si_multirun_writes_the_ranking(tmp_path):
    sweep = tmp_path / "sweep"
    r = run_cli("enigma_lightning.si", "--multirun", "model=tiny", "principles=high_si,low_si", "num_questions=2",
                "rollout.max_new_tokens=6", "bootstrap=20", "wandb_mode=disabled", f"hydra.sweep.dir={sweep}")
    assert r.returncode == 0, r.stderr[-2000:]
    table = (sweep / "si_table.md").read_text()
    assert "| high_si |" in table and "| low_si |" in table and (sweep / "si_bar.png").exists()


def test_sami_projection_saved_once(make_cfg):
    module, _ = _module(make_cfg, "loss=[grpo,sami]", "sami.critic=encoder")
    keys = [k for k in module.state_dict() if "projection" in k]
    assert keys == ["terms.sami.projection.weight", "terms.sami.projection.bias"]


@pytest.mark.parametrize("loss", ["grpo", "[grpo,sami]"])
def test_step_after_rollout_reads_nothing_back_from_the_device(make_cfg, monkeypatch, loss):
    """Forward, loss terms, metrics and backward never read a tensor back to the host (``.item()``, ``tolist``,
    ``bool``/``int``/``float`` of a tensor, ``torch.equal``): on a GPU the step does not wait for the device.
    (Generation and reward scoring must, to decode text; so does the OT term, whose cloud size is data-dependent.)
    The rollout is made beforehand; the watch is on calls made from the package's own files."""
    module, cfg = _module(make_cfg, f"loss={loss}", "step.num_generations=4", "grpo.beta=0.04")
    dm = instantiate(cfg.data)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    buf = module._new_rollout(batch)
    n = buf["advantages"].numel()
    buf["advantages"] = torch.linspace(-1, 1, n)  # a random tiny model's rewards may tie: gradient all the same
    monkeypatch.setattr(module, "_new_rollout", lambda b: buf)

    import sys
    from pathlib import Path

    import enigma_lightning

    package = str(Path(enigma_lightning.__file__).parent)
    reads = []

    def watched(original):
        def wrapper(*args, **kwargs):  # our code may not read tensors back; transformers' own forward does, as in TRL
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(package):
                reads.append(f"{caller}:{sys._getframe(1).f_lineno}")
            return original(*args, **kwargs)
        return wrapper

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, watched(getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "equal", watched(torch.equal))
    loss_value = module.forward_backward(batch)
    monkeypatch.undo()
    assert reads == []
    assert torch.isfinite(loss_value)
    assert any(p.grad is not None and p.grad.any() for p in module.policy.parameters())
