"""Divergence of a tensor-valued g(t, x) with x of shape (k, d1, d2, d3): each of the k samples is one point.

event_dims=3 makes the trailing (d1, d2, d3) one point's features, so the Jacobian is
(k, d1, d2, d3, d1, d2, d3) and the divergence (k,). No flatten breaks the graph.
"""
import torch

import torchjac


def g(t, x):
    return torch.sin(x) * t.reshape(-1, 1, 1, 1) + x.roll(1, dims=-1) * 0.5


torch.manual_seed(0)
k = 5
x = torch.randn(k, 3, 2, 2, dtype=torch.float64, requires_grad=True)
t = torch.rand(k, dtype=torch.float64)

jac = torchjac.jacobian(lambda x, t: g(t, x), x, cond=t, event_dims=3)
div = torchjac.divergence(lambda x, t: g(t, x), x, cond=t, event_dims=3)
print(f"Jacobian {tuple(jac.shape)}, divergence {tuple(div.shape)}")

# Check against torch.autograd.functional.jacobian of each sample on its own.
for i in range(k):
    ref = torch.autograd.functional.jacobian(lambda s: g(t[i:i + 1], s[None])[0], x[i].detach())
    assert torch.allclose(jac[i], ref, atol=1e-12), i
    assert torch.allclose(div[i], ref.reshape(12, 12).trace(), atol=1e-12), i
print("matches autograd.functional.jacobian per sample: ok")

# The divergence is differentiable: it can be a loss term.
div.sum().backward()
assert x.grad is not None and torch.isfinite(x.grad).all()
print("divergence backward: ok")
