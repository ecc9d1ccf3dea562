"""A probe's files: ``probe.json``, ``probe.md`` (one row per layer) and ``probe_layers.png``."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .compare import PER_LAYER


def _json_safe(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def write_outputs(result: dict[str, Any], out: Path, title: str = "policy vs reference") -> None:
    """probe.json, probe.md (one row per layer) and probe_layers.png (each measure against the layer)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "probe.json").write_text(json.dumps(_json_safe(result), indent=2))  # NaN (undefined) -> null
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
