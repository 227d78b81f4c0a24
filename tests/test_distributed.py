"""DistributedDataParallel: torchjac losses on 2 gloo processes give the single-process gradients.

Each rank trains on half of the points. DDP averages the ranks' gradients, so
they must equal the gradients of the mean of the two half losses computed in
one process. The model is float64 so that the check is tight.
"""
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import torchjac

WORLD_SIZE = 2


class RegularizedField(nn.Module):
    """A deformation field whose forward returns its training loss, built on torchjac (the DDP pattern).

    DDP synchronizes gradients of what its forward computes, so the torchjac calls go inside forward.
    """

    def __init__(self):
        super().__init__()
        self.field = torchjac.PointMLP(3, [32, 32], 3, activation="softplus", cond_features=4, skip_layers=(2,))
        self.sdf = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 1))

    def forward(self, x, latent, noise):
        y, jac = torchjac.jacobian(self.field, x, cond=latent, return_output=True)
        eye = torch.eye(3, dtype=x.dtype)
        elastic = ((jac - eye) ** 2).sum((-2, -1)).mean()
        div = torchjac.divergence(self.field, x, cond=latent, estimator="hutchinson", noise=noise)
        grad_sdf = torchjac.jacobian(self.sdf, x + y)[..., 0, :]
        eikonal = ((grad_sdf.norm(dim=-1) - 1) ** 2).mean()
        return elastic + 0.1 * (div ** 2).mean() + eikonal


def _data():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(WORLD_SIZE * 2, 50, 3, generator=g, dtype=torch.float64)
    latent = torch.randn(WORLD_SIZE * 2, 1, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(2, *x.shape, generator=g, dtype=torch.float64)
    return x, latent, noise


def _model():
    torch.manual_seed(0)
    return RegularizedField().double()


def _shard(rank, x, latent, noise):
    rows = slice(rank * 2, rank * 2 + 2)  # each rank's two shapes
    return x[rows], latent[rows], noise[:, rows]


def _worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD_SIZE)
    torch.set_num_threads(1)
    model = DistributedDataParallel(_model())
    x, latent, noise = _shard(rank, *_data())
    latent.requires_grad_(True)
    for _ in range(2):  # two steps: the second runs after DDP's first reduction
        model.zero_grad()
        latent.grad = None
        model(x, latent, noise).backward()
    grads = {n: p.grad for n, p in model.module.named_parameters()}
    try:  # the wrapper itself is refused as f: its forward, which synchronizes gradients, would be bypassed
        torchjac.jacobian(model, x)
        refusal = None
    except TypeError as e:
        refusal = str(e)
    torch.save({"params": grads, "latent": latent.grad, "refusal": refusal}, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # Leave without destructors: freeing DDP's reducer can deadlock with the gloo group's worker thread
    # (the thread waits for the GIL that the destructor holds while joining it): 2 hangs in 21 runs before.
    os._exit(0)


def test_ddp_gradients_equal_single_process(tmp_path):
    workers = mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD_SIZE, join=False)
    deadline = time.monotonic() + 180
    while not workers.join(timeout=1):  # raises if a worker failed
        if time.monotonic() > deadline:
            for process in workers.processes:
                process.kill()
            pytest.fail("the DDP workers did not finish within 180 s")

    model = _model()
    x, latent, noise = _data()
    latent.requires_grad_(True)
    loss = sum(model(*_shard(rank, x, latent, noise)) for rank in range(WORLD_SIZE)) / WORLD_SIZE
    loss.backward()
    for rank in range(WORLD_SIZE):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        for name, p in model.named_parameters():
            torch.testing.assert_close(got["params"][name], p.grad, rtol=1e-12, atol=1e-12, msg=name)
        # latent codes are per rank (not synchronized): each rank's gradient of its own mean loss
        rows = slice(rank * 2, rank * 2 + 2)
        torch.testing.assert_close(got["latent"], WORLD_SIZE * latent.grad[rows], rtol=1e-12, atol=1e-12)
        assert got["refusal"] is not None and "f is a DistributedDataParallel wrapper" in got["refusal"]
        assert "inside the forward" in got["refusal"]


