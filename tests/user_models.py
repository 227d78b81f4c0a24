"""User-written models as they appear in NeRF, FFJORD-style CNF and NeuS code, for the tests and examples."""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm


class NeRFMLP(nn.Module):
    """NeRF's point MLP: ReLU layers, the input concatenated back in after layer `skip`."""

    def __init__(self, d_in=3, width=32, depth=4, skip=2, d_out=4):
        super().__init__()
        self.skips = (skip,)
        layers = [nn.Linear(d_in, width)]
        for i in range(depth - 1):
            layers.append(nn.Linear(width + (d_in if i in self.skips else 0), width))
        self.pts_linears = nn.ModuleList(layers)
        self.output_linear = nn.Linear(width, d_out)

    def forward(self, x):
        h = x
        for i, layer in enumerate(self.pts_linears):
            h = F.relu(layer(h))
            if i in self.skips:
                h = torch.cat([x, h], -1)
        return self.output_linear(h)


class CNFDynamics(nn.Module):
    """A continuous normalizing flow's vector field f(x, t): the time is concatenated to every layer's input."""

    def __init__(self, d=3, width=32):
        super().__init__()
        self.l0 = nn.Linear(d + 1, width)
        self.l1 = nn.Linear(width + d + 1, width)
        self.l2 = nn.Linear(width, d)

    def forward(self, x, t):
        tx = torch.cat([x, t.expand_as(x[..., :1])], -1)
        h = torch.tanh(self.l0(tx))
        h = F.softplus(self.l1(torch.cat([h, tx], -1)))
        return self.l2(h)


class NeuSSDF(nn.Module):
    """NeuS's SDF network: weight-normalized Linear layers, Softplus(beta=100), a skip scaled by 1/sqrt(2)."""

    def __init__(self, d_in=3, width=32, n_layers=5, skip_in=(3,), d_out=1):
        super().__init__()
        dims = [d_in] + [width] * (n_layers - 1) + [d_out]
        self.num_layers = len(dims)
        self.skip_in = skip_in
        for layer in range(self.num_layers - 1):
            out_dim = dims[layer + 1] - dims[0] if layer + 1 in skip_in else dims[layer + 1]
            setattr(self, f"lin{layer}", weight_norm(nn.Linear(dims[layer], out_dim)))
        self.activation = nn.Softplus(beta=100)

    def forward(self, inputs):
        x = inputs
        for layer in range(self.num_layers - 1):
            lin = getattr(self, f"lin{layer}")
            if layer in self.skip_in:
                x = torch.cat([x, inputs], -1) / math.sqrt(2)
            x = lin(x)
            if layer < self.num_layers - 2:
                x = self.activation(x)
        return x


class LatentDeformation(nn.Module):
    """A latent-conditioned deformation field (Nerfies style): the offset MLP([x, latent]), one latent per point."""

    def __init__(self, d_latent=8, width=32):
        super().__init__()
        self.mlp = nn.ModuleList([nn.Linear(3 + d_latent, width), nn.Linear(width, width), nn.Linear(width, 3)])

    def forward(self, x, latent):
        h = torch.cat([x, latent], -1)
        h = F.silu(self.mlp[0](h))
        h = F.silu(self.mlp[1](h))
        return self.mlp[2](h)
