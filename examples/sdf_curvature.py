"""Mean curvature of a neural SDF from its gradient and Hessian, and a curvature regularizer.

For an SDF f, the mean curvature of its level sets (the sum of the principal curvatures) is
    kappa = div(grad f / |grad f|) = (|g|^2 tr(H) - g^T H g) / |g|^3,   g = grad f, H = Hessian of f.
torchjac.jacobian gives g and torchjac.hessian gives H, each in one fused pass that trains. An IGR-style
network (Softplus, a skip) is fit to a sphere of radius 0.5, whose surface has kappa = 2 / 0.5 = 4, with
a small penalty on kappa^2 near the surface, as curvature regularizers do.
"""
import torch
from torch import nn

import torchjac

torch.manual_seed(0)
RADIUS = 0.5
sdf = torchjac.PointMLP(3, [64, 64, 64], 1, activation=nn.Softplus(beta=10), skip_layers=(2,))


def mean_curvature(f, x):
    g = torchjac.jacobian(f, x).squeeze(-2)           # (N, 3)
    hess = torchjac.hessian(f, x).squeeze(-3)         # (N, 3, 3)
    norm = g.norm(dim=-1)
    trace = hess.diagonal(0, -2, -1).sum(-1)
    ghg = torch.einsum("ni,nij,nj->n", g, hess, g)
    return (norm ** 2 * trace - ghg) / norm ** 3


def nested_autograd_curvature(f, x):
    """The same formula with create_graph autograd, as an independent check."""
    x = x.detach().requires_grad_()
    g, = torch.autograd.grad(f(x).sum(), x, create_graph=True)
    hess = torch.stack([torch.autograd.grad(g[:, j].sum(), x, retain_graph=True)[0] for j in range(3)], -2)
    norm = g.norm(dim=-1)
    return (norm ** 2 * hess.diagonal(0, -2, -1).sum(-1) - torch.einsum("ni,nij,nj->n", g, hess, g)) / norm ** 3


def sphere_points(n):
    return nn.functional.normalize(torch.randn(n, 3), dim=-1) * RADIUS


check = torch.rand(32, 3, dtype=torch.float64) * 2 - 1
sdf64 = torchjac.PointMLP(3, [64, 64, 64], 1, activation=nn.Softplus(beta=10), skip_layers=(2,)).double()
assert torch.allclose(mean_curvature(sdf64, check), nested_autograd_curvature(sdf64, check), atol=1e-10)
print("mean curvature matches nested autograd in float64: ok")

opt = torch.optim.Adam(sdf.parameters(), lr=1e-3)
for step in range(400):
    space = torch.rand(1024, 3) * 2 - 1
    near = sphere_points(512) + 0.05 * torch.randn(512, 3)
    fit = ((sdf(space) - (space.norm(dim=-1, keepdim=True) - RADIUS)) ** 2).mean()
    eikonal = ((torchjac.jacobian(sdf, space).squeeze(-2).norm(dim=-1) - 1) ** 2).mean()
    curvature = (mean_curvature(sdf, near) ** 2).mean()
    loss = fit + 0.1 * eikonal + 1e-5 * curvature
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 200 == 0 or step == 399:
        print(f"step {step:3d}: fit {fit.item():.2e}, eikonal {eikonal.item():.2e}, mean kappa^2 {curvature.item():.2f}")

with torch.no_grad():
    kappa = mean_curvature(sdf, sphere_points(2048))
print(f"mean curvature on the sphere: median {kappa.median().item():.3f} (exact {2 / RADIUS:.3f})")
assert abs(kappa.median().item() - 2 / RADIUS) < 0.1 * 2 / RADIUS
print("the fitted SDF has the sphere's curvature within 10%: ok")
