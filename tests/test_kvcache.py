"""The in-place KV cache used while sampling: the same keys, values and tokens as transformers' own cache; the
read-only prompt cache of training under activation checkpointing."""

import pytest
import torch
from helpers import sampling
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from enigma_lightning.data.prompts import PromptTemplate
from enigma_lightning.models.compat import ReadOnlyLayer, ReservedLayer, read_only
from enigma_lightning.models.loading import ModelSpec, load_policy, load_tokenizer
from enigma_lightning.rollout.hf import generate
from enigma_lightning.rollout.sampling import row_seeds


def _steps(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    yield [torch.randn(3, 2, n, 4, generator=g) for n in (5, 1, 1)]  # a prompt, then one token at a time
    while True:
        yield [torch.randn(3, 2, 1, 4, generator=g)]


def test_reserved_layer_returns_what_concatenation_returns_and_writes_in_place(monkeypatch):
    monkeypatch.setattr(ReservedLayer, "granularity", 1)  # the buffer exactly as long as asked
    plain, reserved = DynamicLayer(), ReservedLayer(reserve=4)
    buffers, steps = [], _steps()
    for states in [*next(steps), *(next(steps)[0] for _ in range(6))]:  # 9 updates: past the room reserved
        k0, v0 = plain.update(states, -states)
        k1, v1 = reserved.update(states, -states)
        assert torch.equal(k1, k0) and torch.equal(v1, v0)
        assert reserved.get_seq_length() == plain.get_seq_length() == k0.shape[-2]
        buffers.append(reserved._buffers[0].data_ptr())
        assert k1.data_ptr() == buffers[-1]  # a view of the buffer, not a copy
    # room for 5 + 4 tokens after the prompt: updates 1-5 write into the first buffer, update 6 needs a new one
    assert len(set(buffers[:5])) == 1 and buffers[5] != buffers[4] and len(set(buffers[5:])) == 1


def test_reserved_buffers_of_nearby_prompt_lengths_have_the_same_strides():
    """Attention kernels that cache a plan per shape and strides (cuDNN's) see one stride for prompts of nearby
    lengths, not one per length; the buffer keeps at least the room asked for."""
    strides, sizes = set(), set()
    for n in range(60, 64):  # prompts of 60-63 tokens, 8 tokens reserved
        layer = ReservedLayer(reserve=8)
        k, _ = layer.update(torch.zeros(2, 2, n, 4), torch.zeros(2, 2, n, 4))
        strides.add(k.stride())
        sizes.add(layer._buffers[0].shape[-2])
    assert len(sizes) == 1 and len(strides) == 1
    layer = ReservedLayer(reserve=8)
    layer.update(torch.zeros(1, 1, 60, 4), torch.zeros(1, 1, 60, 4))
    assert layer._buffers[0].shape[-2] >= 68 and layer._buffers[0].shape[-2] % ReservedLayer.granularity == 0


def test_reserved_layer_picks_up_caches_replaced_from_outside():
    """batch_select_indices, crop and the like replace the keys; the next update copies them into a new buffer."""
    plain, reserved = DynamicLayer(), ReservedLayer(reserve=8)
    steps = _steps(1)
    for states in next(steps):
        plain.update(states, states)
        reserved.update(states, states)
    for layer in (plain, reserved):
        layer.batch_select_indices(torch.tensor([2, 0]))
        layer.crop(-2)
    states = next(steps)[0][:2]
    k0, _ = plain.update(states, states)
    k1, _ = reserved.update(states, states)
    assert torch.equal(k1, k0) and k1.shape == (2, 2, 6, 4)


def test_adopted_layer_keeps_the_prefilled_cache_and_leaves_it_untouched():
    prefilled = DynamicLayer()
    prompt = torch.randn(2, 1, 3, 4)
    prefilled.update(prompt, prompt)
    keys = prefilled.keys
    layer = ReservedLayer.adopt(prefilled, reserve=2)
    token = torch.randn(2, 1, 1, 4)
    k, v = layer.update(token, token)
    assert torch.equal(k, torch.cat([prompt, token], dim=-2)) and torch.equal(v, k)
    assert prefilled.keys is keys and torch.equal(keys, prompt)  # the prefill's tensors are not written to


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    spec = ModelSpec(name_or_path=str(tiny_dir))
    return load_tokenizer(spec), load_policy(spec)


@pytest.mark.parametrize("path", ["shared_prefixes", "greedy", "plain"])
def test_generation_samples_the_same_tokens_with_the_reserved_cache(tiny, monkeypatch, path):
    """The three ways generate runs: prompts' shared openings prefilled (sampling with per-row seeds), greedy, and
    generate's own cache (a repetition penalty turns prefix sharing off)."""
    tok, model = tiny
    template = PromptTemplate(system="{principles} Think step by step and answer in the format asked, always.")
    prompts = [template.render(tok, q, v) for q in ("What is 2 + 2?", "Hi there")
               for v in ("Be clear and honest.", "Be vague, never show any steps at all.")]
    from enigma_lightning.rollout import hf as rollout

    updates, prefills = [], []
    real, real_prefill = ReservedLayer.update, rollout.prefill_prompts
    monkeypatch.setattr(ReservedLayer, "update", lambda self, *a, **k: updates.append(1) or real(self, *a, **k))
    monkeypatch.setattr(rollout, "prefill_prompts", lambda *a, **k: prefills.append(1) or real_prefill(*a, **k))
    outs = {}
    for reserve_cache in (True, False):
        cfg_sampling = sampling(max_new_tokens=10, reserve_cache=reserve_cache, seed_per_prompt=True,
                                  repetition_penalty=1.3 if path == "plain" else 1.0)
        before = len(updates)
        if path == "greedy":
            ro = generate(model, tok, prompts, 1, cfg_sampling, greedy=True)
        else:
            ro = generate(model, tok, prompts, 3, cfg_sampling, seeds=row_seeds(0, 2, prompts, 3))
        assert (len(updates) > before) == reserve_cache  # the reserved cache ran, or did not
        outs[reserve_cache] = ro
    assert bool(prefills) == (path != "plain")
    assert torch.equal(outs[True].completion_ids, outs[False].completion_ids)
    assert outs[True].completions == outs[False].completions
    assert outs[True].lengths.float().mean() > 1


def test_read_only_cache_returns_the_prompt_and_the_new_states_and_keeps_the_prompt():
    """A layer replayed by activation checkpointing sees the same cache; gradients reach the cached states; layer
    kinds other than a full-attention DynamicLayer are refused (the cache is left as it was)."""
    prompt_k = torch.randn(2, 3, 5, 4, requires_grad=True)
    cache = DynamicCache()
    cache.update(prompt_k * 1, prompt_k * 2, 0)
    assert read_only(cache) and type(cache.layers[0]) is ReadOnlyLayer
    new = torch.randn(2, 3, 4, 4)
    for _ in range(2):  # the first run, then the replay
        k, v = cache.update(new, -new, 0)
        assert torch.equal(k, torch.cat([prompt_k, new], -2)) and torch.equal(v, torch.cat([prompt_k * 2, -new], -2))
        assert cache.get_seq_length() == 5
    k.sum().backward()
    assert torch.equal(prompt_k.grad, torch.ones_like(prompt_k))
    sliding = DynamicCache()
    sliding.layers = [DynamicLayer(), DynamicSlidingWindowLayer(sliding_window=8)]
    for i in range(2):
        sliding.update(new, new, i)
    before = list(sliding.layers)
    assert not read_only(sliding) and sliding.layers == before
    assert not read_only(DynamicCache(config=None))  # nothing cached yet
