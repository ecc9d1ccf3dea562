"""Information-geometry probes: how a trained policy's hidden-state manifold moved away from its reference.

    python -m enigma_lightning.probe ckpt_path=<run>/checkpoints/last.ckpt      # trained policy vs its base
    python -m enigma_lightning.probe model=<hub id or folder>                    # a model against itself (all 0 / 1)
    python -m enigma_lightning.train callbacks=probes                           # during training, every N steps

The probe set is held-out questions (the bundled eval split by default, never trained on), each rendered with the
run's principle set and followed by a reference chain of thought in the strict XML format (teacher forcing), so
both models read exactly the same tokens. Points are the completion tokens' hidden states. Per layer (0 = the
embeddings):

- ``sinkhorn``: debiased Sinkhorn divergence between the two clouds (rows L2-normalised, geomloss);
- ``cka``: linear CKA of the paired token representations (1 = same geometry up to rotation and scale);
- ``twonn_policy`` / ``twonn_reference``: intrinsic dimension (TwoNN) of each cloud;
- ``erank_policy`` / ``erank_reference``: effective rank of each (centred) cloud;
- ``fisher_rao``: mean Fisher-Rao distance between the next-token distributions, read through the logit lens
  (final norm + unembedding) at intermediate layers; the last layer is the models' true output distribution;
- ``mean_shift``: |mean(policy) - mean(reference)| / |mean(reference)|;
- ``principle_alignment``: cosine between that mean shift and the principle direction, the reference's mean
  hidden state under the principle prompt minus under its antithesis (same completions).

Outputs: ``probe.json``, ``probe.md`` and ``probe_layers.png`` in the output folder, and a W&B run.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from omegaconf import DictConfig

from .probes import geometry as geo

PER_LAYER = ("sinkhorn", "cka", "fisher_rao", "mean_shift", "principle_alignment", "twonn_policy",
             "twonn_reference", "erank_policy", "erank_reference")


def probe_texts(tok, prompt, principles, questions: str = "bundled_eval", num_questions: int = 32,
                seed: int = 0) -> dict[str, list[str]]:
    """Prompts under the principle and its antithesis, and the teacher-forced completions (prefill removed)."""
    import random

    from .data import bundled_path, load_rows
    from .prompts import format_completion

    rows = load_rows(str(bundled_path("eval")) if questions == "bundled_eval" else questions)
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


def _logit_lens(model, hidden: torch.Tensor, is_last: bool) -> torch.Tensor:
    if not is_last:
        norm = getattr(model.get_decoder(), "norm", None)
        hidden = norm(hidden) if norm is not None else hidden
    return model.get_output_embeddings()(hidden)


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
                lp = op.logits[predicts] if last else _logit_lens(policy, hp[predicts], False)
                lr = orf.logits[predicts] if last else _logit_lens(reference, hr[predicts], False)
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


def write_outputs(result: dict[str, Any], out: Path, title: str = "policy vs reference") -> None:
    """probe.json, probe.md (one row per layer) and probe_layers.png (each measure against the layer)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(result, indent=2))
    cols = ["layer", *PER_LAYER]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for i, layer in enumerate(result["layers"]):
        lines.append(f"| {layer} | " + " | ".join(f"{result['per_layer'][k][i]:.4g}" for k in PER_LAYER) + " |")
    (out / "probe.md").write_text(f"# Probe: {title}\n\n" + "\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pl, x = result["per_layer"], result["layers"]
    panels = [("Sinkhorn divergence", ["sinkhorn"]), ("linear CKA", ["cka"]), ("Fisher-Rao (logit lens)", ["fisher_rao"]),
              ("relative mean shift", ["mean_shift"]), ("cos(shift, principle direction)", ["principle_alignment"]),
              ("TwoNN intrinsic dimension", ["twonn_policy", "twonn_reference"]),
              ("effective rank", ["erank_policy", "erank_reference"])]
    fig, axes = plt.subplots(2, 4, figsize=(16, 6.5))
    for ax, (name, keys) in zip(axes.flat, panels, strict=False):
        for k in keys:
            ax.plot(x, pl[k], marker=".", label=k.split("_")[-1] if len(keys) > 1 else None)
        ax.set_title(name)
        ax.set_xlabel("layer")
        if len(keys) > 1:
            ax.legend()
    axes.flat[-1].axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out / "probe_layers.png", dpi=110)
    plt.close(fig)


def run(cfg: DictConfig) -> dict[str, Any]:
    from hydra.utils import instantiate

    from .checkpoints import device_for, load_policy_from, merge_run_config
    from .models import load_policy

    cfg = merge_run_config(cfg)
    out = Path(cfg.paths.output_dir)
    torch.manual_seed(cfg.seed)
    policy, tok = load_policy_from(cfg)
    reference = load_policy(instantiate(cfg.model)).eval()  # the base model, untrained
    device = device_for(cfg.device)
    policy, reference = policy.to(device), reference.to(device)
    principles, prompt = instantiate(cfg.principles), instantiate(cfg.prompt)
    texts = probe_texts(tok, prompt, principles, cfg.questions, cfg.num_questions, cfg.seed)
    result = compare(policy, reference, tok, texts, layers=cfg.layers, fisher_rao_layers=cfg.fisher_rao_layers,
                     batch_size=cfg.batch_size, epsilon=cfg.epsilon, max_points=cfg.max_points, seed=cfg.seed)
    result.update(policy=str(cfg.ckpt_path or cfg.model.name_or_path), reference=str(cfg.model.name_or_path),
                  principles=principles.name)
    write_outputs(result, out, f"{result['policy']} vs {result['reference']}")
    print((out / "probe.md").read_text())
    print(f"wrote {out / 'probe.json'}, {out / 'probe.md'}, {out / 'probe_layers.png'}")
    _log_wandb(cfg, out, result)
    return result


def _log_wandb(cfg: DictConfig, out: Path, result: dict[str, Any]) -> None:
    from .loggers import wandb_run

    run = wandb_run(cfg, out, "probe")
    if run is None:
        return
    import wandb

    run.summary.update({f"probe/{k}": v for k, v in result["summary"].items()})
    cols = ["layer", *PER_LAYER]
    rows = [[layer, *(result["per_layer"][k][i] for k in PER_LAYER)] for i, layer in enumerate(result["layers"])]
    run.log({"probe/layers": wandb.Table(columns=cols, data=rows), "probe/plot": wandb.Image(str(out / "probe_layers.png"))})
    run.finish()


class ProbeCallback(L.Callback):
    """Probes during training (``callbacks=probes``): every ``every_n_steps`` steps, the policy against the frozen
    base model on a small probe set. Logs ``probe/<measure>/mean`` (over layers) and ``probe/<measure>/last`` and
    writes ``<run dir>/probes/step<NNNNNN>/`` (JSON, markdown, PNG). When the run keeps no frozen reference
    (``loss=grpo`` with ``grpo.beta=0``), the callback loads its own copy of the base model on first use."""

    def __init__(self, every_n_steps: int = 10, num_questions: int = 8, layers: list[int] | str = "all",
                 fisher_rao_layers: str = "last", epsilon: float = 0.05, max_points: int = 512, batch_size: int = 8,
                 questions: str = "bundled_eval", write_files: bool = True):
        self.every_n_steps, self.num_questions, self.layers = every_n_steps, num_questions, layers
        self.fisher_rao_layers, self.epsilon, self.max_points = fisher_rao_layers, epsilon, max_points
        self.batch_size, self.questions, self.write_files = batch_size, questions, write_files
        self._reference = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        from lightning.pytorch.strategies import FSDPStrategy

        from .errors import EnigmaError

        if isinstance(trainer.strategy, FSDPStrategy):  # probes run on rank 0 alone; sharded forwards are collective
            raise EnigmaError("callbacks=probes does not run under trainer=fsdp (its forwards would wait on the other "
                              "ranks). Use trainer=ddp or one device, or probe checkpoints with "
                              "python -m enigma_lightning.probe ckpt_path=...")

    def _ref(self, pl_module):
        if pl_module.reference is not None:
            return pl_module.reference
        if self._reference is None:
            from .models import load_policy

            self._reference = load_policy(pl_module.spec).eval().requires_grad_(False).to(pl_module.device)
        return self._reference

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every_n_steps != 0 or not trainer.is_global_zero:
            return
        policy = pl_module.policy  # with LoRA, the adapted model
        texts = probe_texts(pl_module.tokenizer, pl_module.prompt, pl_module.principles, self.questions,
                            self.num_questions, pl_module.seed)
        was_training = policy.training
        policy.eval()
        try:
            result = compare(policy, self._ref(pl_module), pl_module.tokenizer, texts, self.layers,
                             self.fisher_rao_layers, self.batch_size, self.epsilon, self.max_points, pl_module.seed)
        finally:
            policy.train(was_training)
        # straight to the loggers, in the row of the step that just ran (self.log would repeat the value in later rows)
        metrics = {f"probe/{k}": v for k, v in result["summary"].items()}
        for lg in trainer.loggers:
            lg.log_metrics(metrics, step=step - 1)
        if self.write_files:
            write_outputs(result, Path(trainer.default_root_dir) / "probes" / f"step{step:06d}", f"step {step}")


@hydra.main(version_base="1.3", config_path="pkg://enigma_lightning.conf", config_name="probe")
def main(cfg: DictConfig) -> None:
    from .cli import exit_on_user_error

    with exit_on_user_error():
        run(cfg)


def cli() -> None:
    from .cli import entry_point

    entry_point(main)


if __name__ == "__main__":
    cli()
