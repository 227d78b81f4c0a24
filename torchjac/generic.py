"""The generic path: Jacobians of any point-wise callable by batched basis-vector products.

A point-wise f maps x of shape (*batch, *in_event) to y of shape (*batch, *out_event)
and never mixes entries along the batch dims. Then one JVP with the same basis
vector e_j at every point gives column j of every point's Jacobian at once, and
one VJP with the same output basis vector gives a row. f is called on the whole
batch, as the user calls it; the basis vectors are batched with ``vmap``
(``chunk_size`` of them at a time). Everything is torch.func, so it trains,
double-differentiates and compiles like any torch code.

VJPs are the default: PyTorch's reverse-mode formulas are faster than its
forward-mode ones (measured 1.6x on a LayerNorm/GELU block, bench/bench_paths.py),
so JVPs only pay off when d_in < d_out. And with autograd enabled (training),
VJPs are always taken: reverse-over-forward gives wrong gradients for some
PyTorch ops (layer_norm's second-order forward-mode formula,
pytorch/pytorch#196700), while reverse-over-reverse is right for them. The
divergence and the Hutchinson estimate (``e^T J e = (e^T J) e``) use VJPs; a JVP
under autograd is the rows of J applied to v. Second order is built from these:
the Hessian is the Jacobian of the Jacobian, and ``e^T H e`` the JVP along e of
``J e``.
"""
import math
from typing import Callable

import torch
from torch.func import jvp as func_jvp
from torch.func import vjp as func_vjp
from torch.func import vmap


class PointwiseFunction:
    """f (a function of x alone) with the batch and event shapes of its input and output."""

    def __init__(self, fn_name: str, f: Callable, x: torch.Tensor, event_dims: int):
        self.fn_name = fn_name
        self.call = f
        self.batch = tuple(x.shape[:x.dim() - event_dims])
        self.in_event = tuple(x.shape[x.dim() - event_dims:])

    def output_event(self, y: torch.Tensor) -> tuple:
        if not torch.is_tensor(y):
            raise TypeError(f"torchjac.{self.fn_name}: f expected to return a tensor, got {type(y).__name__}")
        if tuple(y.shape[:len(self.batch)]) != self.batch:
            raise ValueError(f"torchjac.{self.fn_name}: f must keep x's leading (point) dims {self.batch}, "
                             f"but returned shape {tuple(y.shape)}; is event_dims right?")
        return tuple(y.shape[len(self.batch):])

    def basis(self, event: tuple, like: torch.Tensor) -> torch.Tensor:
        """(d, *batch, *event): basis vector j repeated at every point, with no copy per point."""
        d = math.prod(event)
        eye = torch.eye(d, dtype=like.dtype, device=like.device).reshape(d, *[1] * len(self.batch), *event)
        return eye.expand(d, *self.batch, *event)


def jacobian(fn_name, f, x, event_dims, chunk_size):
    """(y, J) with J of shape (*batch, *out_event, *in_event)."""
    pf = PointwiseFunction(fn_name, f, x, event_dims)
    y, vjp_fn = func_vjp(pf.call, x)
    out_event = pf.output_event(y)
    d_in, d_out = math.prod(pf.in_event), math.prod(out_event)
    if d_in < d_out and not torch.is_grad_enabled():  # fewer JVPs than VJPs, and no autograd on top
        x = x.contiguous()  # a broadcast (expanded) x cannot take the batched tangents' in-place writes
        columns = vmap(lambda v: func_jvp(pf.call, (x,), (v,))[1], chunk_size=chunk_size)(pf.basis(pf.in_event, x))
        jac = columns.reshape(d_in, *pf.batch, d_out).movedim(0, -1)            # (*batch, d_out, d_in)
    else:
        rows = vmap(lambda u: vjp_fn(u)[0], chunk_size=chunk_size)(pf.basis(out_event, y))
        jac = rows.reshape(d_out, *pf.batch, d_in).movedim(0, len(pf.batch))   # (*batch, d_out, d_in)
    return y, jac.reshape(*pf.batch, *out_event, *pf.in_event)


def divergence(fn_name, f, x, event_dims, chunk_size):
    """(y, trace of J) for f whose output event has as many entries as its input event."""
    pf = PointwiseFunction(fn_name, f, x, event_dims)
    d = math.prod(pf.in_event)
    y, vjp_fn = func_vjp(pf.call, x)
    _check_square(pf, y)
    rows = vmap(lambda u: vjp_fn(u.view_as(y))[0], chunk_size=chunk_size)(pf.basis(pf.in_event, x))
    return y, rows.reshape(d, *pf.batch, d).diagonal(0, 0, -1).sum(-1)


def hutchinson(fn_name, f, x, event_dims, noise, chunk_size):
    """(y, mean_s e_s^T J e_s) with noise of shape (S, *x.shape): one VJP per sample."""
    pf = PointwiseFunction(fn_name, f, x, event_dims)
    y, vjp_fn = func_vjp(pf.call, x)
    _check_square(pf, y)
    products = vmap(lambda e: vjp_fn(e.view_as(y))[0], chunk_size=chunk_size)(noise)  # e^T J
    n_samples, d = noise.shape[0], math.prod(pf.in_event)  # d spelled out: -1 is ambiguous for zero points
    quad = (products.reshape(n_samples, *pf.batch, d) * noise.reshape(n_samples, *pf.batch, d)).sum(-1)
    return y, quad.mean(0)


def jvp(fn_name, f, x, event_dims, v):
    """(y, J v), v shaped like x."""
    pf = PointwiseFunction(fn_name, f, x, event_dims)
    if not torch.is_grad_enabled():
        y, out = func_jvp(pf.call, (x,), (v,))
        pf.output_event(y)
        return y, out
    # Under autograd, from the rows of J: a single JVP would be reverse-over-forward, and the
    # VJP of u -> J^T u would need third derivatives to train; both are wrong for layer_norm.
    y, jac = jacobian(fn_name, f, x, event_dims, None)
    d_in, d_out = math.prod(pf.in_event), math.prod(y.shape[len(pf.batch):])
    out = jac.reshape(*pf.batch, d_out, d_in) @ v.reshape(*pf.batch, d_in, 1)
    return y, out.reshape(y.shape)


def hessian(fn_name, f, x, event_dims, chunk_size=None):
    """(y, H) with H of shape (*batch, *out_event, *in_event, *in_event): the Jacobian of the Jacobian, so it
    takes reverse-over-reverse under autograd like ``jacobian`` (and forward-over-reverse outside it)."""
    y = f(x)
    PointwiseFunction(fn_name, f, x, event_dims).output_event(y)
    _, hess = jacobian(fn_name, lambda x_: jacobian(fn_name, f, x_, event_dims, chunk_size)[1], x, event_dims,
                       chunk_size)
    return y, hess


def laplacian(fn_name, f, x, event_dims):
    """(y, L) with L (*batch, *out_event): the trace of each output's Hessian over the input event."""
    pf = PointwiseFunction(fn_name, f, x, event_dims)
    y, hess = hessian(fn_name, f, x, event_dims)
    d = math.prod(pf.in_event)
    return y, hess.reshape(*y.shape, d, d).diagonal(0, -2, -1).sum(-1)


def laplacian_hutchinson(fn_name, f, x, event_dims, noise):
    """(y, mean_s e_s^T H e_s) with noise of shape (S, *x.shape): the JVP along e of x -> J(x) e per sample,
    or, for S >= d (the input event's size), the whole Hessian once, which then costs less."""
    pf = PointwiseFunction(fn_name, f, x, event_dims)
    d = math.prod(pf.in_event)
    if noise.shape[0] >= d:
        y, hess = hessian(fn_name, f, x, event_dims)
        n_samples, lead = noise.shape[0], pf.batch
        e = noise.reshape(n_samples, *lead, d)
        hess = hess.reshape(*lead, math.prod(y.shape[len(lead):]), d, d)  # spelled out: -1 is ambiguous at 0 points
        return y, (torch.einsum("s...j,...ijk,s...k->...i", e, hess, e) / n_samples).reshape(y.shape)
    y = f(x)
    pf.output_event(y)
    total = 0
    for e in noise:
        along_e = lambda x_, e=e: jvp(fn_name, f, x_, event_dims, e)[1]  # noqa: E731
        total = total + jvp(fn_name, along_e, x, event_dims, e)[1]
    return y, total / noise.shape[0]


def _check_square(pf: PointwiseFunction, y: torch.Tensor):
    out_event = pf.output_event(y)
    if math.prod(out_event) != math.prod(pf.in_event):
        raise ValueError(f"torchjac.{pf.fn_name}: f must map d_in to d_in features for a divergence, but f maps "
                         f"{pf.in_event} -> {out_event} per point")
