"""Input encodings that the fused path composes with the MLP ops: NeRF's frequency (positional) encoding.

An encoding maps x (..., d) to e = cat(blocks) of ``d`` features each: ``x`` itself, or ``sin(c x)`` and
``cos(c x)`` for a frequency ``c`` (NeRF's ``2^k``, with or without ``pi``, or any other). Each feature
depends on one coordinate of x, so within a block the encoding's Jacobian is diagonal: ``de/dx_a`` is
``slope_b[a]`` at coordinate a of block b, with ``slope_b = 1, c cos(c x), -c sin(c x)``.

The ops take e as their input (a skip that reads the encoded input reads e), and this module turns their
results back into derivatives w.r.t. x, as tiny-cuda-nn composes an encoding with a network:
- forward mode: the tangents v of x become ``de/dx v``, the tangents of e (``push``), for the jvp op;
- reverse mode: the op's J w.r.t. e times ``de/dx`` (``pull``).
Autograd differentiates this module's few elementwise ops, so training, double backward and gradients
w.r.t. x reach through the encoding; the MLP ops keep their hand-written backward.
"""
from typing import NamedTuple, Tuple

import torch

KINDS = ("x", "sin", "cos")


class FrequencyEncoding(NamedTuple):
    blocks: Tuple[Tuple[str, float], ...]  # (kind, c) per block: c * x, sin(c x) or cos(c x)

    def features(self, d: int) -> int:
        return d * len(self.blocks)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """e(x), (..., features(d))."""
        parts = []
        for kind, c in self.blocks:
            u = x * c
            parts.append(u if kind == "x" else torch.sin(u) if kind == "sin" else torch.cos(u))
        return torch.cat(parts, -1)

    def slopes(self, x: torch.Tensor) -> torch.Tensor:
        """de/dx per block, (..., n_blocks, d): block b's feature at coordinate a changes by slopes[..., b, a]."""
        parts = []
        for kind, c in self.blocks:
            if kind == "x":
                parts.append(torch.full_like(x, c))
            else:
                u = x * c
                parts.append(c * torch.cos(u) if kind == "sin" else -c * torch.sin(u))
        return torch.stack(parts, -2)

    def push(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The tangents of e along the tangents v (..., k, d) of x: (..., k, features(d))."""
        slopes = self.slopes(x)  # (..., B, d)
        pushed = slopes.unsqueeze(-3) * v.unsqueeze(-2)  # (..., k, B, d)
        return pushed.flatten(-2)

    def pull(self, x: torch.Tensor, jac_e: torch.Tensor) -> torch.Tensor:
        """J w.r.t. x (..., d_out, d) from J w.r.t. e (..., d_out, features(d))."""
        slopes = self.slopes(x)  # (..., B, d)
        per_block = jac_e.unflatten(-1, slopes.shape[-2:])  # (..., d_out, B, d)
        return (per_block * slopes.unsqueeze(-3)).sum(-2)
