"""Entropic optimal transport regulariser: debiased Sinkhorn divergence between the policy's and the frozen
reference's hidden states on the same completions (ENIGMA's bound on "geometry drift").

    S_eps(a, b) = OT_eps(a, b) - OT_eps(a, a) / 2 - OT_eps(b, b) / 2,    cost |x - y|^p / p  (p = 2: |x - y|^2 / 2)

computed with geomloss ``SamplesLoss("sinkhorn")``; ``epsilon`` is the entropic regularisation itself and geomloss'
``blur = epsilon ** (1 / p)``. Reconstruction choices (the paper gives none): points are the completion tokens'
hidden states (``pooling=token``) or one mean per completion (``pooling=mean``) of the chosen ``layers`` (default the
last); they are L2-normalised by default (``normalize=l2``: a cost in [0, 2] on which ``epsilon`` has a fixed
meaning whatever the model's hidden size), or standardised per dimension with the reference's statistics, or left
as they are; at most ``max_points`` per cloud are kept, with the same seeded subset for both clouds (the points are
paired tokens). On several ranks (DDP, FSDP) the clouds are the global batch's, gathered in the one-process order
(``StepBatch.gather``): the divergence, its subsample and its gradient are the one-process step's, whatever the
number of processes. The solver runs in float32 outside autocast and the caller's grad mode is restored after every
call (geomloss turns autograd back on). Degenerate clouds: no points (every completion masked) give 0 and
``degenerate = 1``; one point or identical points are valid inputs with a finite result. Gradients reach the
policy only: the reference's hidden states come from a no-grad forward.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import LossTerm, Needs, StepBatch

POOLINGS = ("token", "mean")
NORMALIZATIONS = ("l2", "standardize", "none")


def sinkhorn_divergence(x: Tensor, y: Tensor, epsilon: float = 0.05, p: int = 2, scaling: float = 0.9,
                        debias: bool = True, backend: str = "tensorized") -> Tensor:
    """Debiased Sinkhorn divergence between uniform clouds x [N, D] and y [M, D] (float32, outside autocast)."""
    from geomloss import SamplesLoss

    if backend == "online":
        try:
            import pykeops  # noqa: F401
        except ImportError as e:
            raise ValueError("ot.backend=online needs pykeops (pip install pykeops); use ot.backend=tensorized") from e
    grad_mode = torch.is_grad_enabled()
    blur = epsilon ** (1 / p)
    try:
        with torch.autocast(device_type=x.device.type, enabled=False):
            x, y = x.float().contiguous(), y.float().contiguous()
            # geomloss derives its epsilon schedule from the clouds' diameter, which is 0 for one point or identical
            # points (log 0): floor it at the blur so degenerate clouds give a finite value.
            with torch.no_grad():
                both = torch.cat([x, y])
                diameter = max(float((both.max(0).values - both.min(0).values).norm()), blur)
            solver = SamplesLoss("sinkhorn", p=p, blur=blur, diameter=diameter, scaling=scaling, debias=debias,
                                 backend=backend)
            return solver(x, y)
    finally:
        torch.set_grad_enabled(grad_mode)  # geomloss re-enables autograd when it returns


def completion_points(hidden: Tensor, mask: Tensor, pooling: str) -> Tensor:
    """hidden [B, T, D], mask [B, T] -> points [N, D]: masked tokens (token) or one mean per completion (mean)."""
    m = mask.bool()
    if pooling == "token":
        return hidden[m]
    if pooling == "mean":
        keep = m.any(dim=1)
        w = m.unsqueeze(-1).to(hidden.dtype)
        return ((hidden * w).sum(1) / w.sum(1).clamp(min=1))[keep]
    raise ValueError(f"ot.pooling must be one of {POOLINGS}; got {pooling!r}")


def normalize_clouds(x: Tensor, y: Tensor, how: str) -> tuple[Tensor, Tensor]:
    """Normalise policy points x and reference points y; standardisation uses the reference's statistics."""
    if how == "l2":
        return torch.nn.functional.normalize(x.float(), dim=-1), torch.nn.functional.normalize(y.float(), dim=-1)
    if how == "standardize":
        mean, std = y.float().mean(0, keepdim=True), y.float().std(0, keepdim=True, unbiased=False).clamp(min=1e-6)
        return (x.float() - mean) / std, (y.float() - mean) / std
    if how == "none":
        return x.float(), y.float()
    raise ValueError(f"ot.normalize must be one of {NORMALIZATIONS}; got {how!r}")


class OTLoss(LossTerm):
    """The OT term (``conf/loss/ot.yaml``, settings under ``ot.*``). ``weight = 0`` keeps it as a monitor: logged,
    not optimised."""

    name = "ot"

    def __init__(self, *, weight: float, epsilon: float, p: int, scaling: float, debias: bool, layers: list[int],
                 pooling: str, normalize: str, max_points: int, backend: str, seed: int):
        super().__init__(weight=weight)
        self.epsilon, self.p, self.scaling, self.debias = epsilon, p, scaling, debias
        self.layers, self.pooling, self.normalize = [int(x) for x in layers], pooling, normalize
        self.max_points, self.backend, self.seed = max_points, backend, seed

    def needs(self) -> Needs:
        return Needs(hidden_layers=tuple(self.layers), reference_hidden_layers=tuple(self.layers))

    def _subsample(self, n: int, step: int, device: torch.device) -> Tensor | None:
        if n <= self.max_points:
            return None
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        return torch.randperm(n, generator=g)[: self.max_points].to(device)

    def forward(self, batch: StepBatch) -> tuple[Tensor, dict[str, Tensor]]:
        hidden, ref_hidden = batch.hidden, batch.ref_hidden  # {layer: [B, T, D]}
        mask, step = batch.completion_mask, batch.step
        values: dict[int, Tensor] = {}
        points = 0
        for layer in self.layers:
            x = completion_points(hidden[layer], mask, self.pooling)
            y = completion_points(ref_hidden[layer].detach(), mask, self.pooling)
            if batch.gather is not None:  # several ranks: one cloud of the global batch, as on one process
                x, y = batch.gather(x), batch.gather(y)
            if x.size(0) == 0:
                continue
            idx = self._subsample(x.size(0), step, x.device)
            if idx is not None:
                x, y = x[idx], y[idx]
            x, y = normalize_clouds(x, y, self.normalize)
            values[layer] = sinkhorn_divergence(x, y, self.epsilon, self.p, self.scaling, self.debias, self.backend)
            points = x.size(0)
        zero = batch.logps.new_zeros(())
        loss = torch.stack(list(values.values())).mean() if values else zero
        metrics = {"divergence": loss.detach(), "points": torch.tensor(float(points)),
                   "degenerate": torch.tensor(float(not values))}
        if len(self.layers) > 1:
            metrics.update({f"divergence/layer_{k}": v.detach() for k, v in values.items()})
        return loss, metrics
