"""Batched Jacobian of a block (B, n) -> (B, m) whose batch entries do not interact, and its inverse.

autograd.functional.jacobian returns (B, m, B, n), mostly zeros; torchjac returns (B, m, n).
"""
import torch
from torch import nn
from torch.func import jacrev, vmap

import torchjac

torch.manual_seed(0)
block1 = nn.Sequential(nn.Linear(6, 32), nn.SiLU(), nn.Linear(32, 6))
x = torch.randn(64, 6, dtype=torch.float64)
block1 = block1.double()

jac = torchjac.jacobian(block1, x)  # (64, 6, 6)
assert torch.allclose(jac, vmap(jacrev(block1))(x), atol=1e-12)
print(f"batched Jacobian {tuple(jac.shape)} matches vmap(jacrev): ok")

jac_inverse = torch.linalg.pinv(jac)  # one pseudo-inverse per sample, no loop
assert torch.isfinite(jac_inverse).all(), "NaN in the inverse Jacobian"
err = (jac_inverse @ jac - torch.eye(6, dtype=torch.float64)).abs().max().item()
assert err < 1e-8, err
print(f"pinv(J) J = I per sample (max error {err:.1e}): ok")
