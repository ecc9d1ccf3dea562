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

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from ..probes.callback import ProbeCallback
from ..probes.compare import PER_LAYER, compare, probe_texts
from ..probes.outputs import write_outputs
from ..runtime.cli import hydra_command

__all__ = ["PER_LAYER", "ProbeCallback", "compare", "probe_texts", "run", "write_outputs"]


def run(cfg: DictConfig) -> dict[str, Any]:
    from hydra.utils import instantiate

    from ..models.loading import load_policy
    from ..runtime.checkpoints import device_for, load_policy_from, merge_run_config

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
    from ..runtime.loggers import wandb_run

    run = wandb_run(cfg, out, "probe")
    if run is None:
        return
    import wandb

    run.summary.update({f"probe/{k}": v for k, v in result["summary"].items()})
    cols = ["layer", *PER_LAYER]
    rows = [[layer, *(result["per_layer"][k][i] for k in PER_LAYER)] for i, layer in enumerate(result["layers"])]
    run.log({"probe/layers": wandb.Table(columns=cols, data=rows), "probe/plot": wandb.Image(str(out / "probe_layers.png"))})
    run.finish()


main, cli = hydra_command(run, "probe")


if __name__ == "__main__":
    cli()
