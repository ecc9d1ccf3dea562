"""Bad values, unknown keys, untrusted targets, bad data files and over-long prompts: each gives a message that names
the key (or file and line), the value and the fix, all at once and before any model loads."""

import pytest
import torch
from helpers import data_module, sampling

from enigma_lightning.errors import DataError
from enigma_lightning.runtime.validate import config_problems

BAD = {  # override -> what the message must say
    "ot.epsilon=0": "ot.epsilon must be a number > 0; got 0. Set ot.epsilon=0.05",
    "ot.p=3": "ot.p must be one of 1, 2; got 3",
    "ot.layers=[99]": "ot.layers=[99] names layers [99] that do not exist: the policy has 3 hidden states",
    "ot.max_points=0": "ot.max_points must be an integer >= 1; got 0",
    "ot.scaling=1.5": "ot.scaling must be a number in (0, 1)",
    "ot.weight=-1": "ot.weight must be a number >= 0",
    "optim.optimizer.lr=-1": "optim.optimizer.lr must be a number > 0; got -1",
    "rollout.top_k=-1": "rollout.top_k must be an integer >= 0; got -1. Set rollout.top_k=0",
    "rollout.long_prompts=right": "rollout.long_prompts must be one of left, error",
    "data.val_size=-1": "data.val_size must be an integer >= 0; got -1",
    "grpo.beta=-1": "grpo.beta must be a number >= 0; got -1",
    "sami.weight=-0.5": "sami.weight must be a number >= 0",
    "sami.temperature=0": "sami.temperature must be a number > 0",
    "reward.weights.format=-1": "reward.weights.format must be a number >= 0",
    "model.dtype=float8": "model.dtype must be one of float32, float64, bfloat16, float16, auto",
    "+trainer.gradient_clip_val=1.0": "the step clips the gradient itself",
    "step.max_grad_norm=-1": "step.max_grad_norm must be a number > 0, or null",
    "step.micro_batch_size=0": "step.micro_batch_size must be an integer >= 1, or null",
    "callbacks.samples.every_n_steps=0": "callbacks.samples.every_n_steps must be an integer >= 1",
    "optim.optimizer.betas=[0.9,1.5]": "optim.optimizer.betas must be two numbers in [0, 1)",
    "+optim.lr=-1": "optim.lr is not a setting (optim takes no 'lr'). The setting is optim.optimizer.lr",
    "+grpo.betaa=1": "grpo.betaa is not a setting (enigma_lightning.losses.GRPOLoss takes no 'betaa'). Did you mean "
                     "grpo.beta?",
    "+rollout.topk=5": "Did you mean rollout.top_k?",
}


def test_every_bad_value_is_reported_at_once_with_key_value_and_fix(make_cfg):
    cfg = make_cfg("experiment=smoke", "loss=full", *BAD)
    problems = config_problems(cfg)
    text = "\n".join(problems)
    for override, needle in BAD.items():
        assert needle in text, (override, text)
    assert len(problems) == len(BAD), text


def test_zero_learning_rate_is_refused(make_cfg):
    assert config_problems(make_cfg("optim.optimizer.lr=0")) == [
        "optim.optimizer.lr must be a number > 0; got 0. Set optim.optimizer.lr=3e-05"]


def test_targets_outside_the_allow_list_are_refused_unless_allowed(make_cfg):
    bad = ["+callbacks.x._target_=builtins.open", "+callbacks.x.file=/tmp/owned", "+callbacks.x.mode=w",
           "optim.optimizer._target_=torch.load"]
    text = "\n".join(config_problems(make_cfg(*bad)))
    assert "callbacks.x._target_=builtins.open is not an allowed target" in text
    assert "allowed_targets=[builtins.open]" in text
    assert "optim.optimizer._target_=torch.load is not an allowed target" in text
    ok = make_cfg("+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true",
                  "allowed_targets=[helpers]")
    assert config_problems(ok) == []
    refused = make_cfg("+reward.funcs.length._target_=helpers.length_reward", "+reward.funcs.length._partial_=true")
    assert any("helpers.length_reward is not an allowed target" in p for p in config_problems(refused))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the message is for machines without a GPU")
def test_fsdp_on_a_cpu_machine_names_the_preset_and_the_fix(make_cfg):
    (p,) = config_problems(make_cfg("trainer=fsdp"))
    assert p.startswith("trainer=fsdp (FSDP2 on CUDA GPUs) needs a CUDA GPU") and "Use trainer=fsdp_cpu" in p
    assert config_problems(make_cfg("trainer=fsdp_cpu")) == []


def test_fsdp_precision_it_cannot_run_names_the_fix(make_cfg):
    (p,) = config_problems(make_cfg("trainer=fsdp_cpu", "trainer.precision=64-true"))
    assert p.startswith("trainer.precision=64-true is not supported under FSDP") and "model.dtype=float64" in p


def test_offline_hub_id_names_the_key_and_both_fixes(make_cfg, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    (p,) = config_problems(make_cfg("model=hf", "model.name_or_path=nobody/no-such-model"))
    assert "model.name_or_path='nobody/no-such-model' is a hub id, but HF_HUB_OFFLINE=1" in p
    assert "local folder" in p and "unset HF_HUB_OFFLINE" in p


def test_unknown_key_through_the_cli_exits_2_before_loading_a_model(tmp_path):
    from helpers import run_cli

    r = run_cli("enigma_lightning.train", "experiment=smoke", "+optim.lr=-1", "ot.epsilon=0", "loss=full",
                f"hydra.run.dir={tmp_path}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "optim.optimizer.lr" in r.stderr and "ot.epsilon must be a number > 0" in r.stderr
    assert not (tmp_path / "config.yaml").exists()


# ---- data files ----------------------------------------------------------------------------------------------------
FILES = {
    "empty.jsonl": ("", "data.path: {f} is empty"),
    "header.csv": ("source,target\n", "data.path: {f} has a header (source, target) but no rows"),
    "broken.jsonl": ('{"source": "a", "target": "1"}\n\n{"source": "b", target: 2}\n',
                     "{f} has 1 malformed line(s):\n  line 3: not valid JSON"),
    "array.jsonl": ('[1, 2]\n', "line 1: a JSON list, not an object"),
    "theirs.csv": ("question,answer\nwhat,1\nwho,2\n",
                   "has no 'source' or 'target' column; its columns are answer, question. Map yours to ours: "
                   "data.columns={source:question,target:answer}"),
    "nested.jsonl": ('{"source": ["a", "b"], "target": "1"}\n{"source": "ok", "target": 3}\n',
                     "row 0: field 'source' is a list, not text"),
}


@pytest.mark.parametrize("name", sorted(FILES))
def test_bad_data_files_name_the_file_line_and_fix(tmp_path, name):
    text, needle = FILES[name]
    f = tmp_path / name
    f.write_text(text)
    with pytest.raises(DataError) as e:
        data_module(path=str(f), val_size=0, batch_size=1, num_generations=1).setup()
    assert needle.replace("{f}", str(f)) in str(e.value)


def test_columns_naming_a_missing_column_lists_the_columns_found(tmp_path):
    f = tmp_path / "theirs.csv"
    f.write_text("question,answer\nwhat,1\n")
    with pytest.raises(DataError, match=r"data.columns.source=prompt: .* has no column 'prompt' \(its columns: "
                                        r"answer, question\)"):
        data_module(path=str(f), val_size=0, columns={"source": "prompt", "target": "answer"}).setup()


def test_val_size_too_large_blames_val_size(tmp_path):
    f = tmp_path / "two.jsonl"
    f.write_text('{"source": "a", "target": "1"}\n{"source": "b", "target": "2"}\n')
    with pytest.raises(DataError, match=r"too few to hold out data.val_size=5 .* Set data.val_size=0"):
        data_module(path=str(f), val_size=5).setup()


# ---- over-long prompts keep their end ------------------------------------------------------------------------------
def test_long_prompts_are_cut_from_the_left_and_keep_the_prefill(tiny_dir):
    from transformers import AutoTokenizer

    from enigma_lightning.data.prompts import PromptTemplate
    from enigma_lightning.rollout.hf import encode_prompts

    tok = AutoTokenizer.from_pretrained(tiny_dir, padding_side="left")
    prompt = PromptTemplate(system="{principles}")
    texts = [prompt.render(tok, "what is " + "one plus " * 200 + "two? END", "Be careful."),
             prompt.render(tok, "2 + 2?", "Be careful.")]
    full, short = tok(texts, add_special_tokens=False)["input_ids"]
    limit = len(short) + 2
    enc = encode_prompts(tok, texts, sampling(max_prompt_length=limit))
    assert enc["input_ids"].shape[1] == limit
    assert enc["input_ids"][0].tolist() == full[-limit:]  # the end: question's end, end of turn, header, prefill
    assert tok.decode(enc["input_ids"][0]).endswith(prompt.prefill)
    with pytest.raises(DataError, match=rf"1 prompt\(s\) are longer than rollout.max_prompt_length={limit} .* "
                                        r"rollout.long_prompts=left"):
        encode_prompts(tok, texts, sampling(max_prompt_length=limit, long_prompts="error"))


# ---- SAMI's encoder critic under step.mask_truncated_completions ---------------------------------------------------
def test_encoder_critic_pools_a_truncated_completion_over_its_tokens():
    from enigma_lightning.losses.base import Layout, StepBatch
    from enigma_lightning.losses.sami import SAMILoss

    torch.manual_seed(0)
    term = SAMILoss(weight=1.0, num_variants=2, critic="encoder", temperature=0.1, layer=-1, negatives_grad=True)
    term.setup(hidden_size=8, encoder_dim=4)
    b, t = 4, 5
    hidden = {-1: torch.randn(b, t, 8)}
    tokens = torch.ones(b, t)
    loss_mask = tokens.clone()
    loss_mask[0] = 0  # completion 0 was truncated and is masked out of the loss

    def batch(mask):
        return StepBatch(torch.zeros(b, 1), torch.ones(b, 1), torch.zeros(b, t), mask, tokens, torch.zeros(b),
                         torch.zeros(b, t), Layout(1, 2, b), hidden=hidden, principle_embeddings=torch.randn(2, 4))

    torch.manual_seed(1)
    masked = term.matrices(batch(loss_mask))
    torch.manual_seed(1)
    assert torch.allclose(masked, term.matrices(batch(tokens)))


# ---- hidden-state layers: checked before loading when the layer count is on disk, after loading otherwise --------
def test_layers_of_a_hub_id_are_checked_from_the_local_hub_cache(make_cfg, tmp_path, monkeypatch):
    import json

    import huggingface_hub.constants

    snap = tmp_path / "models--org--some-model" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap / "config.json").write_text(json.dumps({"num_hidden_layers": 4}))
    (tmp_path / "models--org--some-model" / "refs").mkdir()
    (tmp_path / "models--org--some-model" / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    text = "\n".join(config_problems(make_cfg("model=hf", "model.name_or_path=org/some-model", "loss=[grpo,ot]",
                                              "ot.layers=[-1,7]")))
    assert "ot.layers=[-1, 7] names layers [7] that do not exist: the policy has 5 hidden states" in text, text
    assert config_problems(make_cfg("model=hf", "model.name_or_path=org/some-model", "loss=[grpo,ot]",
                                    "ot.layers=[-5,4]")) == []


def test_layers_unknown_before_loading_are_checked_once_the_policy_has_loaded():
    from transformers import LlamaConfig

    from enigma_lightning.losses.base import check_layers
    from enigma_lightning.losses.ot import OTLoss

    def ot(layers):
        return OTLoss(weight=1.0, epsilon=0.05, p=2, scaling=0.9, debias=True, layers=layers, pooling="token",
                      normalize="l2", max_points=64, backend="tensorized", seed=0)

    config = LlamaConfig(num_hidden_layers=2)
    check_layers({"ot": ot([-3, 0, 2])}, config, "org/model")  # 3 hidden states: all exist
    with pytest.raises(ValueError, match=r"ot\.\* asks for hidden-state layers \[-4, 3\], which org/model does not "
                                         r"have: it has 3 hidden states \(0 = embeddings \.\. 2, or -3 \.\. -1\)"):
        check_layers({"ot": ot([3, -1, -4])}, config, "org/model")
