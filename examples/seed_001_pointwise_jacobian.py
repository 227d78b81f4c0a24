"""A point-wise R^3 -> R^3 network on (B, N, 3): the (B, N, 3, 3) Jacobian, and a loss on it that trains.

Shown for a PointMLP on channels-last points and for a PointNet-style Conv1d stack on (B, 3, N).
"""
import torch
from torch import nn
from torch.func import jacrev, vmap

import torchjac

torch.manual_seed(0)
B, N = 4, 256
x = torch.randn(B, N, 3)

field = torchjac.PointMLP(3, [64, 64], 3, activation="softplus")
jac = torchjac.jacobian(field, x)
ref = vmap(jacrev(field))(x.reshape(-1, 3)).reshape(B, N, 3, 3)
assert jac.shape == (B, N, 3, 3)
assert torch.allclose(jac, ref, atol=1e-5)
print(f"PointMLP: J {tuple(jac.shape)} matches vmap(jacrev): ok")

pointnet = nn.Sequential(nn.Conv1d(3, 64, 1), nn.ReLU(), nn.Conv1d(64, 64, 1), nn.ReLU(), nn.Conv1d(64, 3, 1))
x_cf = x.transpose(1, 2)  # (B, 3, N), PointNet's layout
print("path:", torchjac.explain(pointnet))
jac_cf = torchjac.jacobian(pointnet, x_cf)  # (B, N, 3, 3): point n's Jacobian at [b, n]
ref_cf = vmap(jacrev(lambda p: pointnet(p[None, :, None])[0, :, 0]))(x.reshape(-1, 3)).reshape(B, N, 3, 3)
assert torch.allclose(jac_cf, ref_cf, atol=1e-5)
print(f"Conv1d stack on (B, 3, N): J {tuple(jac_cf.shape)} matches: ok")

# The loss the question could not train: pull each Jacobian towards a rotation-free identity.
opt = torch.optim.Adam(field.parameters(), lr=1e-2)
losses = []
for _ in range(30):
    loss = ((torchjac.jacobian(field, x) - torch.eye(3)) ** 2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    losses.append(loss.item())
assert losses[-1] < 0.5 * losses[0], losses
print(f"||J - I||^2 training: {losses[0]:.4f} -> {losses[-1]:.4f}: ok")
