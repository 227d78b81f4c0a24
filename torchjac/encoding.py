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
import math
from typing import Callable, NamedTuple, Tuple

import torch

from . import activations as act
from . import reference

KINDS = ("x", "sin", "cos")


class FrequencyEncoding(NamedTuple):
    blocks: Tuple[Tuple[str, float], ...]  # (kind, c) per block: c * x, sin(c x) or cos(c x)

    def features(self, d: int) -> int:
        return d * len(self.blocks)

    def value(self, x: torch.Tensor) -> torch.Tensor:
        """e(x), (..., features(d))."""
        parts = []
        for kind, c in self.blocks:
            if kind == "sin":  # sine's value and derivative are the activation's (torchjac/activations.py)
                parts.append(act.value(act.Act.SINE, c, 0.0, x))
            else:
                parts.append(x * c if kind == "x" else torch.cos(x * c))
        return torch.cat(parts, -1)

    def slopes(self, x: torch.Tensor) -> torch.Tensor:
        """de/dx per block, (..., n_blocks, d): block b's feature at coordinate a changes by slopes[..., b, a]."""
        parts = []
        for kind, c in self.blocks:
            if kind == "sin":
                parts.append(act.derivative(act.Act.SINE, c, 0.0, x))
            else:
                parts.append(torch.full_like(x, c) if kind == "x" else -c * torch.sin(x * c))
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


def compose(encoding: FrequencyEncoding, op: Callable, mode: str, x: torch.Tensor, *extra):
    """(y, out) of a first-order mode of an MLP that reads encoding(x), from ``op(mode, e, *extra)``, the op on e.

    The reverse mode's J w.r.t. e is pulled back through de/dx; the forward modes push their tangents (the basis,
    the jvp tangents or the Hutchinson noise) through de/dx into the jvp op and reduce its J v as the op of the
    mode would (reference.reduce_tangents).
    """
    e = encoding.value(x)
    if mode == "jacobian_reverse":
        y, jac_e = op(mode, e)
        return y, encoding.pull(x, jac_e)
    if mode in reference.SECOND_ORDER_MODES:
        raise ValueError(f"{mode} through an input encoding has no fused path; the generic path computes it")
    d = x.shape[-1]
    v = (torch.eye(d, dtype=x.dtype, device=x.device).expand(*x.shape[:-1], d, d)
         if mode in reference.BASIS_MODES else extra[0])
    y, jv = op("jvp", e, encoding.push(x, v))  # (..., k, d_out)
    lead = x.shape[:-1]
    n_points = math.prod(lead)  # spelled out: -1 cannot give it for k = 0 tangents
    t = jv.reshape(n_points, *jv.shape[-2:]).transpose(0, 1)
    out = reference.reduce_tangents(mode, t, v.reshape(n_points, *v.shape[-2:]))
    return y, out.reshape((*lead, *out.shape[1:]))
