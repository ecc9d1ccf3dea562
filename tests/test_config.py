"""Every config group option composes; validation reports every problem at once; CLI conveniences."""

import pytest
from hydra.utils import instantiate
from omegaconf import OmegaConf

from enigma_lightning.errors import ConfigError
from enigma_lightning.runtime.cli import config_options, rewrite_model_override
from enigma_lightning.runtime.validate import config_problems, validate

GROUPS = ["model", "peft", "encoder", "data", "principles", "prompt", "loss", "step", "rollout", "reward", "optim",
          "trainer", "logger", "callbacks", "hydra", "paths", "experiment", "debug", "hparams_search"]
NEEDS_VALUE = {"model=hf": ["model.name_or_path=/tmp"], "data=local": ["data.path=/tmp/x.jsonl"]}


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(make_cfg, group):
    options = sorted(config_options(group))
    assert options, group
    for option in options:
        override = f"{group}=[grpo,{option}]" if group == "loss" and option != "grpo" else f"{group}={option}"
        cfg = make_cfg(override, *NEEDS_VALUE.get(override, []))
        OmegaConf.resolve(cfg)  # every interpolation resolves
        assert cfg.loss.grpo


def test_cheap_nodes_instantiate(make_cfg):
    cfg = make_cfg()
    for key in ("grpo", "step", "rollout", "reward", "prompt", "principles", "data"):
        assert instantiate(cfg[key]) is not None
    for option in config_options("principles"):
        ps = instantiate(make_cfg(f"principles={option}").principles)
        assert ps.text.strip() and ps.antithesis.strip() and ps.name == option
    opt = instantiate(make_cfg("optim=adamw_warmup").optim)
    import torch

    o = opt.optimizer([torch.nn.Parameter(torch.zeros(1))])
    assert opt.scheduler(o) is not None


@pytest.mark.parametrize("preset", ["cpu", "ddp_cpu"])
def test_cpu_trainers_instantiate(make_cfg, preset):
    trainer = instantiate(make_cfg(f"trainer={preset}", "logger=none").trainer, logger=False)
    assert trainer.max_steps > 0


@pytest.mark.parametrize("preset", ["fsdp", "fsdp_cpu"])
def test_fsdp_strategy_builds(make_cfg, preset):
    from lightning.pytorch.strategies import ModelParallelStrategy

    cfg = make_cfg(f"trainer={preset}")
    strategy = instantiate(cfg.trainer.strategy)
    assert isinstance(strategy, ModelParallelStrategy) and strategy._tensor_parallel_size == 1
    assert "wrap_classes" not in cfg.trainer.strategy  # blocks come from the model's _no_split_modules
    with pytest.raises(Exception, match="trainer.strategy.data_parallel_size is set from trainer.devices"):
        instantiate(cfg.trainer.strategy, data_parallel_size=2)


def test_default_config_is_valid(make_cfg):
    assert config_problems(make_cfg()) == []
    assert config_problems(make_cfg("experiment=smoke")) == []


def test_all_problems_reported_at_once(make_cfg, tmp_path):
    cfg = make_cfg("step.num_generations=1", "grpo.loss_type=ppo", "rollout.temperature=0",
                   f"data.path={tmp_path}/missing.jsonl", "+loss.bogus=true", "trainer.max_steps=0",
                   f"ckpt_path={tmp_path}/none.ckpt", "+reward.weights.typo=1.0")
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    for needle in ["step.num_generations must be >= 2", "Set step.num_generations=4", "grpo.loss_type must be one of",
                   "rollout.temperature must be > 0", "missing.jsonl' does not exist", "loss.bogus is selected but `bogus` has no _target_",
                   "trainer.max_steps must be >= 1", "ckpt_path: file", "reward.weights.typo"]:
        assert needle in msg, needle
    assert len(e.value.problems) == 8


def test_loss_without_grpo_names_the_fix(make_cfg):
    assert config_problems(make_cfg("loss=ot")) == [
        "loss must include the grpo term; got ['ot']. Use loss=[grpo,ot]"]


def test_batch_must_be_divisible_by_group(make_cfg):
    problems = config_problems(make_cfg("data.batch_size=10", "step.num_generations=4"))
    assert problems == ["data.batch_size counts completions per step and must be a positive multiple of "
                        "step.num_generations=4; got 10. Set data.batch_size=8"]


def test_model_override_accepts_hub_ids_and_folders():
    assert rewrite_model_override(["model=Qwen/Qwen2.5-0.5B-Instruct", "x=1"]) == [
        "model=hf", "model.name_or_path=Qwen/Qwen2.5-0.5B-Instruct", "x=1"]
    assert rewrite_model_override(["model=tiny"]) == ["model=tiny"]
    assert rewrite_model_override(["model=./ckpt"]) == ["model=hf", "model.name_or_path=./ckpt"]


def test_bad_config_exits_with_message(tmp_path):
    from helpers import run_cli

    r = run_cli("enigma_lightning.train", "experiment=smoke", "step.num_generations=1", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2
    assert "step.num_generations must be >= 2" in r.stderr and "Traceback" not in r.stderr


def test_moved_keys_name_their_new_place():
    from enigma_lightning.runtime.cli import moved_keys

    assert moved_keys(["grpo.num_generations=8", "grpo.beta=0.1"]) == [
        "grpo.num_generations is now step.num_generations (the group a step learns from, conf/step/): set "
        "step.num_generations=8"]


def test_trls_max_completion_length_runs_as_max_new_tokens(make_cfg):
    from enigma_lightning.runtime.cli import other_names
    from enigma_lightning.runtime.validate import config_problems

    argv, notes = other_names(["max_completion_length=64", "+rollout.max_completion_length=32", "seed=1"])
    assert argv == ["rollout.max_new_tokens=64", "rollout.max_new_tokens=32", "seed=1"]
    assert notes[0] == "max_completion_length is TRL's name for rollout.max_new_tokens: running with " \
                       "rollout.max_new_tokens=64"
    assert make_cfg(*argv[:1]).rollout.max_new_tokens == 64
    # set in a config file (here: added as a key), it is named, with the setting to use
    assert config_problems(make_cfg("+max_completion_length=64")) == [
        "max_completion_length is TRL's name for rollout.max_new_tokens; set rollout.max_new_tokens=64 (and remove "
        "max_completion_length)"]
