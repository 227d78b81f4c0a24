"""Pure-PyTorch kernels of the ops, for any device without a fused kernel.

They flatten the leading dims, map each point to its row of the broadcast
``cond``, and run the reference math over chunks of points small enough that
the per-layer rows ``[h; t]`` of a chunk stay in cache. They run below autograd,
so the reference math may write its buffers in place (``differentiable=False``).
"""
import math

import torch

from . import reference

# Bytes of [h; t] rows per chunk; a few such buffers are live per layer, so this sits in L2.
CHUNK_BYTES = 1 << 20


def rows_per_chunk(n_tangents: int, weights, itemsize: int) -> int:
    width = max(w.shape[0] for w in weights)
    return max(16, CHUNK_BYTES // ((1 + n_tangents) * width * itemsize))


class FlatPoints:
    """x as (P, d_in) rows and, per chunk, the matching rows of a broadcast cond."""

    def __init__(self, x: torch.Tensor, cond: torch.Tensor):
        self.lead = tuple(x.shape[:-1])
        self.n = math.prod(self.lead)
        self.x = x.reshape(self.n, x.shape[-1])
        cond_lead = tuple(cond.shape[:-1])
        self.cond = cond.reshape(math.prod(cond_lead), cond.shape[-1])
        if cond_lead == self.lead:
            self.group = None
        else:  # index of each point's cond row; cond's broadcast dims repeat a row
            groups = torch.arange(self.cond.shape[0], device=x.device).view(cond_lead)
            self.group = groups.expand(self.lead).reshape(-1)

    def chunks(self, size: int):
        for start in range(0, self.n, size):
            yield slice(start, min(start + size, self.n))

    def cond_rows(self, rows: slice) -> torch.Tensor:
        return self.cond[rows] if self.group is None else self.cond[self.group[rows]]

    def add_cond_grad(self, grad_cond: torch.Tensor, rows: slice, grad_rows: torch.Tensor):
        if self.group is None:
            grad_cond[rows] += grad_rows
        else:
            grad_cond.index_add_(0, self.group[rows], grad_rows)


def _flat_tangents(tangents, points: FlatPoints):
    if tangents is None:
        return None
    return tangents.reshape(points.n, tangents.shape[-2], tangents.shape[-1])


def output_shape(mode: str, lead, d_in: int, d_out: int, tangents) -> tuple:
    if mode == "jacobian":
        return (*lead, d_out, d_in)
    if mode in ("divergence", "hutchinson"):
        return tuple(lead)
    return (*lead, tangents.shape[-2], d_out)


def forward(mode, x, cond, weights, biases, activations, activation_params, skip_layers, tangents=None):
    points = FlatPoints(x, cond)
    flat_tangents = _flat_tangents(tangents, points)
    d_in, d_out = x.shape[-1], weights[-1].shape[0]
    k = d_in if tangents is None else tangents.shape[-2]
    y = x.new_empty(points.n, d_out)
    out = x.new_empty(output_shape(mode, (points.n,), d_in, d_out, tangents))
    for rows in points.chunks(rows_per_chunk(k, weights, x.element_size())):
        y_rows, out_rows = reference.forward(
            mode, points.x[rows], points.cond_rows(rows), weights, biases, activations, activation_params,
            skip_layers, None if flat_tangents is None else flat_tangents[rows], differentiable=False)
        y[rows] = y_rows
        out[rows] = out_rows
    return y.view(*points.lead, d_out), out.view(output_shape(mode, points.lead, d_in, d_out, tangents))


def backward(mode, grad_y, grad_out, x, cond, weights, biases, activations, activation_params, skip_layers,
             tangents=None):
    points = FlatPoints(x, cond)
    flat_tangents = _flat_tangents(tangents, points)
    d_in, d_out = x.shape[-1], weights[-1].shape[0]
    k = d_in if tangents is None else tangents.shape[-2]
    grad_y = grad_y.reshape(points.n, d_out)
    grad_out = grad_out.reshape(output_shape(mode, (points.n,), d_in, d_out, tangents))
    grad_x = x.new_zeros(points.x.shape)
    grad_cond = cond.new_zeros(points.cond.shape)
    # Contiguous, whatever the parameters' strides (a transposed or tied weight): the fake kernel and the
    # CUDA kernels return them so.
    grad_weights = [w.new_zeros(w.shape) for w in weights]
    grad_biases = [b.new_zeros(b.shape) for b in biases]
    grad_tangents = x.new_zeros(flat_tangents.shape) if mode == "jvp" else None
    for rows in points.chunks(rows_per_chunk(k, weights, x.element_size())):
        g = reference.backward(
            mode, grad_y[rows], grad_out[rows], points.x[rows], points.cond_rows(rows), weights, biases,
            activations, activation_params, skip_layers, None if flat_tangents is None else flat_tangents[rows],
            differentiable=False)
        grad_x[rows] = g.x
        points.add_cond_grad(grad_cond, rows, g.cond)
        for total, part in zip(grad_weights + grad_biases, g.weights + g.biases):
            total += part
        if grad_tangents is not None:
            grad_tangents[rows] = g.tangents
    grads = (grad_x.view(x.shape), grad_cond.view(cond.shape), grad_weights, grad_biases)
    if mode == "jvp":
        grads += (grad_tangents.view(tangents.shape),)
    return grads
