"""Policy vs reference on a probe set: hidden-state clouds per layer and every geometry measure of
:mod:`.geometry` (the measures are described in :mod:`enigma_lightning.probe`)."""

from __future__ import annotations

import math
from typing import Any

import torch

from ..models import compat
from . import geometry as geo

PER_LAYER = ("sinkhorn", "cka", "fisher_rao", "mean_shift", "principle_alignment", "twonn_policy",
             "twonn_reference", "erank_policy", "erank_reference")


def probe_texts(tok, prompt, principles, questions: str = "bundled_eval", num_questions: int = 32,
                seed: int = 0) -> dict[str, list[str]]:
    """Prompts under the principle and its antithesis, and the teacher-forced completions (prefill removed)."""
    import random

    from ..data.datasets import load_rows
    from ..data.prompts import format_completion

    rows = load_rows(questions)
    rows = [r for r in rows if r.get("rationale")]
    random.Random(seed).shuffle(rows)
    rows = rows[:num_questions]
    comps = [format_completion(r["rationale"], r["target"]) for r in rows]
    comps = [c.removeprefix(prompt.prefill) for c in comps]
    out = {"principle": [prompt.render(tok, r["source"], principles.text) for r in rows], "completions": comps}
    if principles.antithesis:
        out["antithesis"] = [prompt.render(tok, r["source"], principles.antithesis) for r in rows]
    return out


def _batches(tok, prompts: list[str], completions: list[str], batch_size: int, device):
    for s in range(0, len(prompts), batch_size):
        p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[s : s + batch_size]]
        c_ids = [tok(c, add_special_tokens=False)["input_ids"] for c in completions[s : s + batch_size]]
        n = max(len(a) + len(b) for a, b in zip(p_ids, c_ids, strict=True))
        ids = torch.full((len(p_ids), n), tok.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        comp = torch.zeros_like(ids, dtype=torch.bool)  # positions of completion tokens (right padding)
        for i, (a, b) in enumerate(zip(p_ids, c_ids, strict=True)):
            ids[i, : len(a) + len(b)] = torch.tensor(a + b)
            attn[i, : len(a) + len(b)] = 1
            comp[i, len(a) : len(a) + len(b)] = True
        yield ids.to(device), attn.to(device), comp.to(device)


def _logit_lens(model, hidden: torch.Tensor) -> torch.Tensor:
    """Next-token logits read from an intermediate layer: the final norm, then the unembedding."""
    norm = compat.final_norm(model)
    return model.get_output_embeddings()(norm(hidden) if norm is not None else hidden)


@torch.no_grad()
def hidden_clouds(model, tok, prompts, completions, layers: list[int], batch_size: int = 8) -> dict[int, torch.Tensor]:
    """{layer: completion-token hidden states [N, D]} (float32, CPU)."""
    device = next(model.parameters()).device
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids, attn, comp in _batches(tok, prompts, completions, batch_size, device):
        hs = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False).hidden_states
        for layer in layers:
            out[layer].append(hs[layer][comp].float().cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


@torch.no_grad()
def compare(policy, reference, tok, texts: dict[str, list[str]], layers: list[int] | str = "all",
            fisher_rao_layers: str = "all", batch_size: int = 8, epsilon: float = 0.05, max_points: int = 1024,
            seed: int = 0) -> dict[str, Any]:
    """Every per-layer measure (see the module doc) of ``policy`` against ``reference`` on ``texts``."""
    n_layers = policy.config.num_hidden_layers + 1
    layers = list(range(n_layers)) if layers == "all" else sorted({int(x) % n_layers for x in layers})
    device = next(policy.parameters()).device
    fr_sum = {layer: 0.0 for layer in layers}
    fr_n = 0
    pol: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    ref: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for ids, attn, comp in _batches(tok, texts["principle"], texts["completions"], batch_size, device):
        op = policy(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
        orf = reference(input_ids=ids, attention_mask=attn, output_hidden_states=True, use_cache=False)
        predicts = torch.zeros_like(comp)
        predicts[:, :-1] = comp[:, 1:]  # position t predicts token t + 1
        fr_n += int(predicts.sum())
        for layer in layers:
            hp, hr = op.hidden_states[layer], orf.hidden_states[layer]
            pol[layer].append(hp[comp].float().cpu())
            ref[layer].append(hr[comp].float().cpu())
            last = layer == n_layers - 1
            if fisher_rao_layers == "all" or last:
                lp = op.logits[predicts] if last else _logit_lens(policy, hp[predicts])
                lr = orf.logits[predicts] if last else _logit_lens(reference, hr[predicts])
                fr_sum[layer] += float(geo.fisher_rao(lp, lr).sum())
    anti = (hidden_clouds(reference, tok, texts["antithesis"], texts["completions"], layers, batch_size)
            if "antithesis" in texts else None)
    per_layer: dict[str, list[float]] = {k: [] for k in PER_LAYER}
    for layer in layers:
        x, y = torch.cat(pol[layer]), torch.cat(ref[layer])
        direction = y.double().mean(0) - anti[layer].double().mean(0) if anti is not None else None
        shift = x.double().mean(0) - y.double().mean(0)
        row = {
            "sinkhorn": geo.sinkhorn(x, y, epsilon=epsilon, max_points=max_points, seed=seed),
            "cka": geo.linear_cka(x, y),
            "fisher_rao": fr_sum[layer] / max(fr_n, 1) if fisher_rao_layers == "all" or layer == n_layers - 1
            else float("nan"),
            "mean_shift": geo.relative_shift(x, y),
            "principle_alignment": geo.cosine(shift, direction) if direction is not None else float("nan"),
            "twonn_policy": geo.twonn_dimension(x), "twonn_reference": geo.twonn_dimension(y),
            "erank_policy": geo.effective_rank(x), "erank_reference": geo.effective_rank(y),
        }
        for k in PER_LAYER:
            per_layer[k].append(row[k])
    summary = {}
    for k, v in per_layer.items():
        finite = [a for a in v if not math.isnan(a)]
        summary[f"{k}/mean"] = sum(finite) / len(finite) if finite else float("nan")
        summary[f"{k}/last"] = v[-1]
    return {"layers": layers, "per_layer": per_layer, "summary": summary, "num_tokens": fr_n,
            "num_questions": len(texts["principle"])}
