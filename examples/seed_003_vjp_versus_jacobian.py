"""What backward(grad_output) computes: the vector-Jacobian product v^T J, not J itself.

For f(x) = (x + 1)^2 applied element-wise, J is diagonal with 2 (x + 1); backward with v gives
v * 2 (x + 1). torchjac.jacobian gives the full per-point J, and torchjac.jvp gives J v.
"""
import torch

import torchjac

x = torch.eye(2, dtype=torch.float64).requires_grad_()  # two points with 2 features each
f = lambda x: (x + 1) ** 2  # noqa: E731

jac = torchjac.jacobian(f, x)  # (2, 2, 2): one 2x2 Jacobian per row of x
print("per-point Jacobians:\n", jac)
assert torch.allclose(jac, torch.diag_embed(2 * (x.detach() + 1)))

v = torch.ones_like(x)
f(x).backward(v)
vjp = torch.einsum("pi,pij->pj", v, jac)
assert torch.allclose(x.grad, vjp)
print("x.grad after backward(v) equals v^T J per point:", x.grad.tolist(), "ok")

assert torch.allclose(torchjac.jvp(f, x.detach(), v), torch.einsum("pij,pj->pi", jac, v))
print("jvp(f, x, v) equals J v: ok")
