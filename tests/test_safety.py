"""Untrusted files never run code: checkpoints load with weights_only=True, a run folder's config may only name the
project's own and the named libraries' targets, and its trust_remote_code is not taken silently."""

import os

import torch
from helpers import run_cli
from omegaconf import OmegaConf


class Payload:
    def __reduce__(self):
        return os.system, (f"touch {os.environ['PAYLOAD_MARK']}",)


def _run_folder(tmp_path, **model):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {"_target_": "enigma_lightning.models.loading.ModelSpec", "name_or_path": "tiny:llama", **model}}
    OmegaConf.save(OmegaConf.create(cfg), run / "config.yaml")
    return run


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    mark = tmp_path / "owned"
    monkeypatch.setenv("PAYLOAD_MARK", str(mark))
    from enigma_lightning.errors import EnigmaError
    from enigma_lightning.runtime.checkpoints import load_checkpoint

    ckpt = _run_folder(tmp_path) / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {"policy.x": torch.zeros(1)}, "payload": Payload()}, ckpt)
    try:
        load_checkpoint(ckpt)
        raise AssertionError("loaded")
    except EnigmaError as e:
        assert "holds objects other than tensors and plain values" in str(e) and "refused" in str(e)
    assert not mark.exists()


def test_a_truncated_checkpoint_names_the_file(tmp_path):
    from enigma_lightning.errors import EnigmaError
    from enigma_lightning.runtime.checkpoints import load_checkpoint

    ckpt = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"policy.x": torch.zeros(1000)}}, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    try:
        load_checkpoint(ckpt)
        raise AssertionError("loaded")
    except EnigmaError as e:
        assert str(ckpt) in str(e) and "truncated" in str(e)


def test_run_folder_targets_outside_the_allow_list_are_refused(tmp_path):
    run = _run_folder(tmp_path)
    cfg = OmegaConf.load(run / "config.yaml")
    cfg.prompt = {"_target_": "builtins.exec", "source": "open('/tmp/x', 'w')"}
    cfg.allowed_targets = ["builtins"]  # a run folder cannot widen the list
    OmegaConf.save(cfg, run / "config.yaml")
    torch.save({"state_dict": {}}, run / "checkpoints" / "last.ckpt")
    r = run_cli("enigma_lightning.evaluate", f"ckpt_path={run / 'checkpoints' / 'last.ckpt'}", "wandb_mode=disabled",
                f"hydra.run.dir={tmp_path / 'eval'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "config.yaml: prompt._target_=builtins.exec is not an allowed target" in r.stderr


def test_run_folder_trust_remote_code_is_not_taken_silently(tmp_path):
    from enigma_lightning.errors import EnigmaError
    from enigma_lightning.runtime.checkpoints import merge_run_config

    run = _run_folder(tmp_path, trust_remote_code=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    torch.save({"state_dict": {}}, ckpt)
    cfg = OmegaConf.create({"ckpt_path": str(ckpt), "model": {"name_or_path": "x", "trust_remote_code": False}})
    try:
        merge_run_config(cfg)
        raise AssertionError("merged")
    except EnigmaError as e:
        assert "sets model.trust_remote_code=true" in str(e) and "model.trust_remote_code=true" in str(e)
    cfg.model.trust_remote_code = True
    assert merge_run_config(cfg).model.name_or_path == "tiny:llama"


def test_hydra_callback_targets_are_checked_before_hydra_builds_them():
    from enigma_lightning.runtime.cli import hydra_target_problems

    bad = "+hydra.callbacks.x._target_=builtins.exec"
    assert hydra_target_problems([bad]) == [
        "hydra.callbacks.x._target_=builtins.exec is not an allowed target (the project's own, Hydra's plugins, ...). "
        "If you trust it, allow it explicitly: allowed_targets=[builtins.exec]"]
    assert hydra_target_problems([bad, "allowed_targets=[builtins.exec]"]) == []
    assert hydra_target_problems(["+hydra.callbacks.r._target_=enigma_lightning.commands.report.SweepReportCallback"]) == []
