"""The Jacobian of y = W x is W; and a loss that pulls a hidden-layer Jacobian towards the identity.

The Jacobian from a hidden layer to the output is the Jacobian of the sub-network after that
layer, evaluated at the hidden activations: no Python loop over output components.
"""
import torch
from torch import nn

import torchjac

torch.manual_seed(0)
linear = nn.Sequential(nn.Linear(2, 2, bias=False))
x = torch.randn(10, 2)
jac = torchjac.jacobian(linear, x)
assert torch.equal(jac, linear[0].weight.detach().expand(10, 2, 2))
print("J of y = W x is W at every point: ok")

encoder = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
decoder = nn.Sequential(nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 16))  # hidden -> output
opt = torch.optim.Adam([*encoder.parameters(), *decoder.parameters()], lr=1e-2)
data = torch.randn(128, 8)
first = None
for step in range(60):
    hidden = encoder(data)
    out, jac = torchjac.jacobian(decoder, hidden, return_output=True)  # (128, 16, 16)
    loss = (jac - torch.eye(16)).abs().mean() + 0.1 * out.pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    first = loss.item() if first is None else first
print(f"|J_hidden->out - I| loss: {first:.4f} -> {loss.item():.4f}")
assert loss.item() < 0.6 * first
print("hidden-layer Jacobian-to-identity training: ok")
