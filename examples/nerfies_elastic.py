"""A Nerfies-style elastic regularizer on a latent-conditioned deformation field.

The field is a user-written module (x, latent) -> offset; torch.fx recognizes it, so it runs
on the fused path. The elastic energy is the squared log of the singular values of the
per-point 3x3 Jacobian of the warp x + offset, under Geman-McClure robustness.
"""
import torch
import torch.nn.functional as F
from torch import nn

import torchjac


class DeformationField(nn.Module):
    def __init__(self, d_latent=8, width=64):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(3 + d_latent, width), nn.Linear(width, width),
                                     nn.Linear(width + 3 + d_latent, width), nn.Linear(width, 3)])

    def forward(self, x, latent):
        inp = torch.cat([x, latent], -1)
        h = F.softplus(self.layers[0](inp))
        h = F.softplus(self.layers[1](h))
        h = F.softplus(self.layers[2](torch.cat([h, inp], -1)))
        return self.layers[3](h)


def elastic_loss(jac_offset, scale=0.03):
    warp_jac = jac_offset + torch.eye(3)
    log_sv = torch.log(torch.linalg.svdvals(warp_jac).clamp_min(1e-6))
    energy = (log_sv ** 2).sum(-1)
    return (2 * energy / (energy + 4 * scale ** 2)).mean()  # Geman-McClure


torch.manual_seed(0)
field = DeformationField()
print("path:", torchjac.explain(field, cond=True))
assert torchjac.explain(field, cond=True).path == "fused"

latents = nn.Parameter(torch.randn(4, 8) * 0.1)  # one latent code per frame
x = torch.rand(4, 512, 3) * 2 - 1
latent = latents[:, None, :].expand(4, 512, 8)  # per point, as the field's cat needs

jac = torchjac.jacobian(field, x, cond=latent)
x0 = x[0, :4].clone().requires_grad_()
out = field(x0, latent[0, :4])
ref = torch.stack([torch.autograd.grad(out[:, i].sum(), x0, retain_graph=True)[0] for i in range(3)], -2)
assert torch.allclose(jac[0, :4], ref, atol=1e-5)
print("deformation Jacobian matches autograd: ok")

opt = torch.optim.Adam([*field.parameters(), latents], lr=1e-2)
first = None
for step in range(20):
    jac = torchjac.jacobian(field, x, cond=latents[:, None, :].expand(4, 512, 8))
    loss = elastic_loss(jac)
    opt.zero_grad()
    loss.backward()
    opt.step()
    first = loss.item() if first is None else first
print(f"elastic loss: {first:.4f} -> {loss.item():.4f}")
assert loss.item() < first and latents.grad is not None
print("elastic regularizer training (latents receive gradients): ok")
