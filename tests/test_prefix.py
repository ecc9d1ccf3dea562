"""Shared prompt prefixes: the plan, and forwards and generation through it equal the plain ones."""

import pytest
import torch
from helpers import sampling

from enigma_lightning.data.prompts import PromptTemplate
from enigma_lightning.models.compat import cache_argument, select_rows
from enigma_lightning.models.loading import ModelSpec, load_policy, load_tokenizer
from enigma_lightning.rollout.hf import generate
from enigma_lightning.rollout.logprobs import per_token_logps
from enigma_lightning.rollout.prefix import PrefixPlan, prefill_prompts

QUESTIONS = ("What is 2 + 2?", "Hi", "Name three colours of the rainbow, please")
VARIANTS = ("Be clear, careful and honest in every step.", "Be vague and evasive; never show any of the steps.")


def left_padded(rows: list[list[int]], pad: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, rows))
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_plan_groups_prompts_by_their_shared_opening():
    a, b = list(range(100, 130)), list(range(200, 230))  # two openings of 30 tokens, sharing nothing
    rows = [a + [1, 2], b + [3], a + [4, 5, 6], b + [7, 8], [9, 9, 9]]
    plan = PrefixPlan.from_prompts(*left_padded(rows))
    assert plan.lengths == (32, 31, 33, 32, 3)
    assert sorted(plan.groups) == [(0, 2), (1, 3)]
    assert sorted(plan.prefixes) == [tuple(a), tuple(b)]
    assert plan.row_group[4] == -1 and plan.row_prefix_lengths[4] == 0
    assert plan.ungrouped().groups == () and plan.ungrouped().lengths == plan.lengths


def test_plan_prefers_two_long_openings_to_one_short_one():
    """Grouping minimises the tokens run: a 10-token opening common to all four prompts loses to two 40-token
    openings common to pairs (a greedy run over the sorted prompts would take the 10 tokens)."""
    common = list(range(10))
    a, b = common + list(range(100, 130)), common + list(range(200, 230))
    rows = [a + [1], a + [2], b + [3], b + [4]]
    plan = PrefixPlan.from_prompts(*left_padded(rows))
    assert sorted(plan.groups) == [(0, 1), (2, 3)] and sorted(map(len, plan.prefixes)) == [40, 40]


def test_plan_keeps_a_suffix_skips_short_openings_and_refuses_right_padding():
    a = list(range(100, 120))
    plan = PrefixPlan.from_prompts(*left_padded([a, a + [1, 2]]))  # one prompt is the other's opening
    assert plan.groups == ((0, 1),) and len(plan.prefixes[0]) == len(a) - 1  # every prompt keeps a token
    short = PrefixPlan.from_prompts(*left_padded([[1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]))
    assert short.groups == ()  # below MIN_PREFIX: not worth a forward of its own
    ids, mask = left_padded([a, a + [1, 2]])
    assert PrefixPlan.from_prompts(ids.flip(1), mask.flip(1)) is None  # right-padded: no plan, plain forward


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    spec = ModelSpec(name_or_path=str(tiny_dir))
    return load_tokenizer(spec), load_policy(spec)


def _prompts(tok):
    template = PromptTemplate(system="{principles} Think step by step and answer in the format asked, always.")
    return [template.render(tok, q, v) for q in QUESTIONS for v in VARIANTS]  # (question, variant)


def test_generation_through_shared_prefixes_equals_plain_generation(tiny, monkeypatch):
    tok, model = tiny
    prompts = _prompts(tok)
    cfg_sampling = sampling(max_new_tokens=12, seed_per_prompt=True)
    shared = generate(model, tok, prompts, 1, cfg_sampling, greedy=True)
    assert len(shared.prefixes.groups) == 2  # one per principle variant
    from enigma_lightning.rollout import hf as rollout

    calls = []
    real = rollout.prefill_prompts
    monkeypatch.setattr(rollout, "prefill_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    from enigma_lightning.rollout.sampling import row_seeds

    sampled = generate(model, tok, prompts, 3, cfg_sampling, seeds=row_seeds(0, 1, prompts, 3))
    assert calls
    monkeypatch.setattr(PrefixPlan, "from_prompts", classmethod(lambda cls, *a, **k: None))  # the plain path
    plain = generate(model, tok, prompts, 1, cfg_sampling, greedy=True)
    plain_sampled = generate(model, tok, prompts, 3, cfg_sampling, seeds=row_seeds(0, 1, prompts, 3))
    assert len(calls) == 1 and plain.prefixes is None
    assert shared.completions == plain.completions
    assert torch.equal(shared.completion_ids, plain.completion_ids)
    assert sampled.completions == plain_sampled.completions  # the same random streams give the same samples
    assert len(set(sampled.completions)) > 1


def test_share_prompts_off_runs_every_row_and_samples_the_same(tiny, monkeypatch):
    """``rollout.share_prompts=false`` skips the shared prefill (every row runs its whole prompt) and, seeded per
    completion, samples what the shared path samples."""
    tok, model = tiny
    prompts = _prompts(tok)
    from enigma_lightning.rollout import hf as rollout
    from enigma_lightning.rollout.sampling import row_seeds

    seeds = row_seeds(0, 1, prompts, 3)
    on = generate(model, tok, prompts, 3, sampling(max_new_tokens=10, seed_per_prompt=True), seeds=seeds)
    calls = []
    real = rollout.prefill_prompts
    monkeypatch.setattr(rollout, "prefill_prompts", lambda *a, **k: calls.append(1) or real(*a, **k))
    off = generate(model, tok, prompts, 3, sampling(max_new_tokens=10, seed_per_prompt=True,
                                                          share_prompts=False), seeds=seeds)
    assert not calls and off.prefixes is not None  # the plan is still made (the training forwards use it)
    assert off.completions == on.completions and torch.equal(off.completion_ids, on.completion_ids)


def test_forward_through_shared_prefixes_equals_plain_forward(tiny):
    """Log-probs, hidden states and gradients with prefixes shared equal the plain forward over every row."""
    tok, model = tiny
    ro = generate(model, tok, _prompts(tok), 3, sampling(max_new_tokens=10))
    assert len(ro.prefixes.groups) == 2
    args = (model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask, 0.9)
    results = []
    for kwargs in ({"num_generations": 1}, {"num_generations": 3, "prefixes": ro.prefixes},
                   {"num_generations": 3, "prefixes": ro.prefixes.ungrouped()}):
        model.zero_grad()
        logps, hidden = per_token_logps(*args, hidden_layers=(0, -1), **kwargs)
        ((logps * ro.completion_mask).sum() + hidden[-1].pow(2).mean()).backward()
        results.append((logps.detach(), hidden[-1].detach(), [p.grad.clone() for p in model.parameters()]))
    m = ro.completion_mask.bool()
    (lp0, h0, g0) = results[0]
    for lp, h, grads in results[1:]:
        torch.testing.assert_close(lp[m], lp0[m], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(h[m], h0[m], rtol=1e-4, atol=1e-4)
        for a, b in zip(g0, grads, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5)


def test_store_runs_a_frozen_models_prefixes_once(tiny):
    tok, model = tiny
    enc = tok(_prompts(tok), return_tensors="pt", padding=True, add_special_tokens=False)
    plan = PrefixPlan.from_prompts(enc["input_ids"], enc["attention_mask"])
    forwards = []
    hook = model.register_forward_hook(lambda mod, args, out: forwards.append(1))
    store: dict = {}
    try:
        with torch.no_grad():
            first = prefill_prompts(model, enc["input_ids"], enc["attention_mask"], plan, store=store)
            n_first = len(forwards)
            second = prefill_prompts(model, enc["input_ids"], enc["attention_mask"], plan, store=store)
            third = prefill_prompts(model, enc["input_ids"], enc["attention_mask"], plan, store=store)
    finally:
        hook.remove()
    assert n_first == 2 and len(forwards) == 4  # prefixes + suffixes, then suffixes only
    assert list(store) == [plan.prefixes]
    torch.testing.assert_close(second.last_logits, first.last_logits)
    torch.testing.assert_close(third.last_logits, first.last_logits)  # the stored cache was not changed by use
    for a, b in zip(first.cache.layers, third.cache.layers, strict=True):
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values)


def test_the_cache_goes_by_the_name_the_installed_transformers_takes(tiny):
    """transformers 5.24 renamed ``past_key_values`` to ``cache`` (the old name warns there, and goes in 5.40):
    generation and the shared-prompt forwards pass and read the cache under the name the model's forward takes, so
    neither warns, whichever release is installed."""
    import inspect
    import logging
    import warnings

    tok, model = tiny
    takes = inspect.signature(model.forward).parameters
    assert cache_argument(model) == ("cache" if "cache" in takes else "past_key_values")
    assert cache_argument(model) in takes
    once = getattr(logging.Logger.warning_once, "cache_clear", None)  # transformers logs some warnings once only
    if once is not None:
        once()
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    tokens: list[int] = []  # tokens each forward runs
    hook = model.register_forward_pre_hook(lambda m, args, kw: tokens.append(kw["input_ids"].size(1)), with_kwargs=True)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ro = generate(model, tok, _prompts(tok), 3, sampling(max_new_tokens=6))  # shared prefill, own cache
            n = len(tokens)
            logps, _ = per_token_logps(model, ro.prompt_ids, ro.prompt_mask, ro.completion_ids, ro.completion_mask,
                                       num_generations=3, prefixes=ro.prefixes)
    finally:
        logger.removeHandler(handler)
        hook.remove()
    assert ro.prefixes.groups and torch.isfinite(logps).all()
    # generate took the prefilled cache: after the prefixes' and the suffixes' forwards, one token per step
    assert n == 2 + 6 and tokens[2:n] == [1] * 6
    # the training forward: the prefixes, the suffixes (with their last token), the completions on their cache
    assert tokens[n:] == [tokens[0], tokens[1] + 1, ro.completion_ids.size(1)]
    messages = [str(w.message) for w in caught] + [r.getMessage() for r in records]
    assert not [m for m in messages if "past_key_values" in m or "cache_params" in m], messages


def test_rows_taken_from_a_shared_opening_get_the_same_gradients_every_time():
    """Prompts that share an opening take copies of its cache rows; the copies' gradients add up into the rows in a
    fixed order, so a forward and backward repeated on the same inputs gives bit-identical gradients (indexing's
    backward adds them with atomic adds across threads on CPU: 16 distinct results in 20 calls on a 2-core machine
    before). The values are the selected rows, and a layer kind with its own selection keeps it."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    from enigma_lightning.models.compat import _adopt

    torch.manual_seed(0)
    k = torch.randn(2, 3, 176, 64, requires_grad=True)
    v = torch.randn(2, 3, 176, 64, requires_grad=True)
    rows = [0, 0, 0, 1, 0, 0]
    g = torch.randn(len(rows), 3, 176, 64)

    def grads():
        k.grad = v.grad = None
        cache = DynamicCache()
        cache.update(k * 1, v * 1, 0)
        select_rows(cache, rows, torch.tensor(rows))
        keys, values = cache.layers[0].keys, cache.layers[0].values
        assert torch.equal(keys, k.detach()[rows]) and torch.equal(values, v.detach()[rows])
        ((keys * g).sum() + (values * 2 * g).sum()).backward()
        return k.grad.clone(), v.grad.clone()

    runs = [grads() for _ in range(20)]
    assert all(torch.equal(a, runs[0][0]) and torch.equal(b, runs[0][1]) for a, b in runs)
    summed = torch.zeros_like(k).index_add_(0, torch.tensor(rows), g)
    torch.testing.assert_close(runs[0][0], summed, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(runs[0][1], 2 * summed, rtol=1e-6, atol=1e-6)

    class OwnSelection(DynamicLayer):
        def batch_select_indices(self, indices):
            self.selected = indices.tolist()

    cache = DynamicCache()
    cache.update(k.detach(), v.detach(), 0)
    cache.layers[0] = own = _adopt(OwnSelection(), cache.layers[0])
    select_rows(cache, rows, torch.tensor(rows))
    assert own.selected == rows and own.keys.size(0) == 2  # its own selection ran, not ours
