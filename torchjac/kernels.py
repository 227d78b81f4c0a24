"""Pure-PyTorch kernels of the ops, for any device without a fused kernel.

They flatten the leading dims, map each point to its row of the broadcast
``cond``, and run the reference math over chunks of points small enough that
the per-layer rows ``[h; t]`` of a chunk stay in cache. They run below autograd,
so the reference math may write its buffers in place (``differentiable=False``).

On the CPU the chunks run side by side, one per intra-op thread, in a single
parallel region (``_C.parallel_chunks``, csrc/python/module.cpp); each chunk's
ops are single-threaded (an input of one chunk runs on the calling thread).
A loop of small multi-threaded ops would instead wait
at every op's barrier for a thread the OS has descheduled, which on a machine
whose cores other processes share cost 3x (bench/bench_models.py measures it).
The workers flush subnormals to zero (csrc/python/module.cpp says why).
"""
import math

import torch

from . import _C, reference

# Bytes of [h; t] rows per chunk; a few such buffers are live per layer, so this sits in L2.
CHUNK_BYTES = 1 << 20


def rows_per_chunk(mode: str, x: torch.Tensor, weights, tangents) -> int:
    """Points per chunk: their value and tangent (or cotangent) rows fill CHUNK_BYTES at the widest layer.

    On the CPU an input of several chunks is cut into at least one chunk per worker, since each chunk runs on one
    thread: 8 chunks on 32 threads would leave 24 idle. An input of one chunk runs whole, its ops multi-threaded.
    """
    width = max(w.shape[0] for w in weights)
    rows = reference.rows_per_point(mode, x.shape[-1], weights[-1].shape[0], tangents)
    fits_cache = max(16, CHUNK_BYTES // (rows * width * x.element_size()))
    n_points = math.prod(x.shape[:-1])
    if x.device.type == "cpu" and n_points > fits_cache:
        return min(fits_cache, max(16, -(-n_points // _C.max_workers())))
    return fits_cache


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
        return [slice(start, min(start + size, self.n)) for start in range(0, self.n, size)]

    def cond_rows(self, rows: slice) -> torch.Tensor:
        return self.cond[rows] if self.group is None else self.cond[self.group[rows]]

    def add_cond_grad(self, grad_cond: torch.Tensor, rows: slice, grad_rows: torch.Tensor):
        if self.group is None:
            grad_cond[rows] += grad_rows
        else:
            grad_cond.index_add_(0, self.group[rows], grad_rows)


def run_chunks(x: torch.Tensor, chunks, fn):
    """fn(rows, worker) for every chunk of rows; chunks with the same worker never run at the same time.

    On the CPU the chunks are shared out among the intra-op threads, so fn must write only its own rows, or
    accumulate into state of its own worker (worker < _C.max_workers()). A worker takes the next chunk as it
    finishes one, unless deterministic algorithms are asked for: then each worker has fixed chunks, taken in
    order. Elsewhere they run in order (worker 0).
    """
    if x.device.type == "cpu":
        dynamic = not torch.are_deterministic_algorithms_enabled()
        _C.parallel_chunks(lambda i, worker: fn(chunks[i], worker), len(chunks), dynamic)
    else:
        for rows in chunks:
            fn(rows, 0)


class WorkerSums:
    """Sums of tensors shaped like `shapes`, one set per worker, added up once all chunks are done."""

    def __init__(self, like: torch.Tensor, shapes):
        self.like, self.shapes = like, [tuple(s) for s in shapes]
        self.per_worker = {}

    def __getitem__(self, worker: int):
        if worker not in self.per_worker:  # dict insertion is atomic under the GIL
            self.per_worker[worker] = [self.like.new_zeros(s) for s in self.shapes]
        return self.per_worker[worker]

    def total(self):
        sums = [self.like.new_zeros(s) for s in self.shapes]  # contiguous, whatever the parameters' strides
        for worker in sorted(self.per_worker):  # a fixed order, for deterministic algorithms
            for acc, part in zip(sums, self.per_worker[worker]):
                acc += part
        return sums


def _flat_tangents(tangents, points: FlatPoints):
    if tangents is None:
        return None
    return tangents.reshape(points.n, tangents.shape[-2], tangents.shape[-1])


def output_shape(mode: str, lead, d_in: int, d_out: int, tangents) -> tuple:
    if mode in ("jacobian", "jacobian_reverse"):
        return (*lead, d_out, d_in)
    if mode in ("divergence", "hutchinson"):
        return tuple(lead)
    if mode in ("laplacian", "laplacian_hutchinson"):
        return (*lead, d_out)
    if mode == "hessian":
        return (*lead, d_out, d_in, d_in)
    return (*lead, tangents.shape[-2], d_out)


def kept_layers(mode, n_points: int, weights, states: torch.Tensor):
    """Views of the flat states buffer: each layer's kept pre-activations, shaped as reference.kept_shapes says;
    None when the mode keeps none."""
    shapes = reference.kept_shapes(mode, n_points, weights)
    if not shapes:
        return None
    sizes = [math.prod(shape) for shape in shapes]
    return [part.view(shape) for part, shape in zip(states.split(sizes), shapes)]


def states_size(mode, x, weights) -> int:
    """Elements of the states buffer the forward keeps for the backward (0 for modes that keep none)."""
    n_points = math.prod(x.shape[:-1])
    return sum(math.prod(shape) for shape in reference.kept_shapes(mode, n_points, weights))


def forward(mode, x, cond, weights, biases, activations, activation_params, skip_layers, tangents=None,
            keep_states=False):
    """(y, out, states); with keep_states, states holds what reference.kept_shapes says the backward reuses."""
    points = FlatPoints(x, cond)
    flat_tangents = _flat_tangents(tangents, points)
    d_in, d_out = x.shape[-1], weights[-1].shape[0]
    y = x.new_empty(points.n, d_out)
    out = x.new_empty(output_shape(mode, (points.n,), d_in, d_out, tangents))
    states = x.new_empty(states_size(mode, x, weights) if keep_states else 0)
    kept = kept_layers(mode, points.n, weights, states) if keep_states else None

    def chunk(rows, worker):
        y[rows], out[rows] = reference.forward(
            mode, points.x[rows], points.cond_rows(rows), weights, biases, activations, activation_params,
            skip_layers, None if flat_tangents is None else flat_tangents[rows], differentiable=False,
            keep_into=None if kept is None else [layer[:, rows] for layer in kept])

    run_chunks(x, points.chunks(rows_per_chunk(mode, x, weights, tangents)), chunk)
    return y.view(*points.lead, d_out), out.view(output_shape(mode, points.lead, d_in, d_out, tangents)), states


def backward(mode, grad_y, grad_out, x, cond, weights, biases, activations, activation_params, skip_layers,
             tangents=None, states=None):
    """Gradients of the op; states is the forward's (an empty or missing one: recompute the forward)."""
    points = FlatPoints(x, cond)
    flat_tangents = _flat_tangents(tangents, points)
    kept = kept_layers(mode, points.n, weights, states) if states is not None and states.numel() > 0 else None
    d_in, d_out = x.shape[-1], weights[-1].shape[0]
    grad_y = grad_y.reshape(points.n, d_out)
    grad_out = grad_out.reshape(output_shape(mode, (points.n,), d_in, d_out, tangents))
    grad_x = x.new_zeros(points.x.shape)
    grad_tangents = x.new_zeros(flat_tangents.shape) if mode == "jvp" else None
    # Per worker: the weight and bias gradients, and cond's where points share cond rows. The fake kernel and
    # the CUDA kernels return contiguous gradients, and so do these sums.
    shared_cond = points.group is not None
    sums = WorkerSums(x, [w.shape for w in weights] + [b.shape for b in biases]
                      + ([points.cond.shape] if shared_cond else []))
    grad_cond = None if shared_cond else cond.new_zeros(points.cond.shape)

    def chunk(rows, worker):
        g = reference.backward(
            mode, grad_y[rows], grad_out[rows], points.x[rows], points.cond_rows(rows), weights, biases,
            activations, activation_params, skip_layers, None if flat_tangents is None else flat_tangents[rows],
            differentiable=False, kept=None if kept is None else [layer[:, rows] for layer in kept])
        grad_x[rows] = g.x
        own = sums[worker]
        points.add_cond_grad(own[-1] if shared_cond else grad_cond, rows, g.cond)
        for total, part in zip(own, g.weights + g.biases):
            total += part
        if grad_tangents is not None:
            grad_tangents[rows] = g.tangents

    run_chunks(x, points.chunks(rows_per_chunk(mode, x, weights, tangents)), chunk)
    totals = sums.total()
    n_layers = len(weights)
    grad_weights, grad_biases = totals[:n_layers], totals[n_layers:2 * n_layers]
    if shared_cond:
        grad_cond = totals[-1]
    grads = (grad_x.view(x.shape), grad_cond.view(cond.shape), grad_weights, grad_biases)
    if mode == "jvp":
        grads += (grad_tangents.view(tangents.shape),)
    return grads
