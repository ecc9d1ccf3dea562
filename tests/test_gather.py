"""OT's cloud over ranks (step.distributed.gather_rows): two gloo processes, each with its half of the points, give
the one-process Sinkhorn divergence, and their gradients, averaged as DDP and FSDP average them, are the one-process
gradient of every point. Without the gather each rank's divergence is its own half's (checked too)."""

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from enigma_lightning.losses.ot import sinkhorn_divergence
from enigma_lightning.step.distributed import gather_rows


def _points(seed=0, n=(5, 3), d=4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(sum(n), d, generator=g, dtype=torch.float64)
    return x, x + 0.3 * torch.randn(sum(n), d, generator=g, dtype=torch.float64)  # uneven halves: 5 and 3 points


def _rank(rank, world, init, out):
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        x, y = _points()
        part = slice(0, 5) if rank == 0 else slice(5, 8)
        xs = x[part].clone().requires_grad_(True)
        value = sinkhorn_divergence(gather_rows(xs), gather_rows(y[part]), scaling=0.99)
        value.backward()
        own = sinkhorn_divergence(xs.detach(), y[part], scaling=0.99)
        torch.save({"value": value.detach(), "grad": xs.grad, "own": own}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_gathered_cloud_gives_the_one_process_divergence_and_gradient(tmp_path):
    world = 2
    mp.spawn(_rank, args=(world, f"file://{tmp_path}/init", str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(world))
    x, y = _points()
    x = x.clone().requires_grad_(True)
    value = sinkhorn_divergence(x, y, scaling=0.99)
    value.backward()
    assert value.item() > 1e-3
    for r in (r0, r1):
        torch.testing.assert_close(r["value"], value.detach(), rtol=1e-6, atol=1e-9)
    # DDP/FSDP average the ranks' gradients: each rank's rows carry world x its share
    grad = torch.cat([r0["grad"], r1["grad"]]) / world
    torch.testing.assert_close(grad, x.grad, rtol=1e-5, atol=1e-8)
    # the ranks' own halves alone are different divergences: the gather is what makes them equal
    assert abs(r0["own"].item() - value.item()) > 1e-3 and abs(r1["own"].item() - value.item()) > 1e-3
