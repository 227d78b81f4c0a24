"""A signed distance function with the eikonal loss |grad f| = 1 (IGR / NeuS style).

Softplus(beta=100) and weight-normalized layers, fit to a sphere of radius 0.5 for a few
steps. The eikonal term uses the d_out = 1 Jacobian, i.e. the gradient of the SDF.
"""
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import torchjac

torch.manual_seed(0)
sdf = torchjac.PointMLP(3, [64, 64, 64], 1, activation=nn.Softplus(beta=100), skip_layers=(2,))
for i, layer in enumerate(sdf.layers):
    sdf.layers[i] = weight_norm(layer)

surface = nn.functional.normalize(torch.randn(1024, 3), dim=-1) * 0.5
space = torch.rand(1024, 3) * 2 - 1
opt = torch.optim.Adam(sdf.parameters(), lr=1e-3)


def losses():
    on_surface = sdf(surface).abs().mean()
    grad = torchjac.jacobian(sdf, space).squeeze(-2)  # (1024, 3): the gradient of the SDF
    eikonal = ((grad.norm(dim=-1) - 1) ** 2).mean()
    return on_surface, eikonal


# The gradient from torchjac equals autograd's.
x = space[:8].clone().requires_grad_()
ref = torch.autograd.grad(sdf(x).sum(), x)[0]
assert torch.allclose(torchjac.jacobian(sdf, space[:8]).squeeze(-2), ref, atol=1e-5)
print("SDF gradient matches autograd: ok")

first = None
for step in range(100):
    on_surface, eikonal = losses()
    loss = on_surface + 0.1 * eikonal
    opt.zero_grad()
    loss.backward()
    opt.step()
    first = loss.item() if first is None else first
print(f"surface + 0.1 * eikonal loss: {first:.4f} -> {loss.item():.4f}")
assert loss.item() < 0.5 * first
print("SDF training with the eikonal loss: ok")
