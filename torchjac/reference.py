"""The reference math of the torchjac ops, in pure PyTorch, on flat rows of points.

Forward: tangent propagation. Every layer carries the rows ``[h; t_1..t_k]``
of each point through one GEMM, then the activation maps ``h <- act(z)`` and
``t <- act'(z) * tz``. With ``tangents=None`` the tangents are the ``d_in``
basis vectors, so ``t`` ends as the transposed Jacobian.

Reverse (mode ``jacobian_reverse``): for d_out < d_in, one forward pass that
keeps each layer's slope ``act'(z)``, then the ``d_out`` cotangent rows
``e_j^T dy/dh`` carried back through the layers: fewer rows per GEMM than the
``d_in`` tangents (2 instead of 4 for an SDF on 3-d points). Its gradient is
the backward of the jvp mode with the Jacobian's cotangent as the tangents,
because ``<G, J> = sum_j (J G_j)_j``.

Second order (modes ``laplacian``, ``laplacian_hutchinson``, ``hessian``): the
same pass carries, after the k tangent rows, second-order rows ``s``: the
second derivatives of h along pairs of tangents. A layer maps them linearly
(``sz = W s``; the input's are 0), and the activation adds its curvature:
``s <- act'(z) * sz + act''(z) * q(tz)``, with ``q`` the sum of squares of the
tangents for one collapsed row (the Laplacian with basis tangents, the
Hutchinson sum with noise tangents) or ``tz_a * tz_b`` for each Hessian pair
(``SecondOrder``).

Backward: the hand-written reverse of the tangent pass. It needs each layer's
input rows and pre-activations, then walks back through the layers. It needs
the activations' second derivative, because ``t`` depends on ``z`` via ``act'``,
and for the second-order rows the third, because ``s`` depends on it via ``act''``.
The reverse mode's forward can keep each layer's pre-activation ``z`` and the
cotangent rows it carried back (``kept_shapes``); its backward then rebuilds the
layer inputs from them elementwise, repeats just the GEMMs of the tangent rows,
and carries back only the value row. Without them it recomputes the forward.

Both functions are built from differentiable ops, so double backward is autograd
through ``backward``. The CPU kernels run them below autograd with
``differentiable=False``, which lets them write the rows in place.

Rows are laid out tangent-major, (1+k+m, P, n): the value row, each tangent and
each second-order row are contiguous blocks, and one GEMM of all rows does a layer.

Shapes: x (P, d_in), cond (P, c) (c may be 0), tangents (P, k, d_in) or None,
weights[i] (out_i, in_i), biases[i] (out_i,). Layer 0 reads ``cat([x, cond])``;
a skip layer reads ``cat([h, x, cond])``.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch

from . import activations as act

MODES = ("jacobian", "divergence", "jvp", "hutchinson", "jacobian_reverse",
         "laplacian", "laplacian_hutchinson", "hessian")
SECOND_ORDER_MODES = ("laplacian", "laplacian_hutchinson", "hessian")
# Modes whose tangents are the d_in basis vectors, the same at every point.
BASIS_MODES = ("jacobian", "divergence", "laplacian", "hessian")


def second_order_rows(mode: str, k: int) -> int:
    """Second-order rows a point carries after its k tangents (csrc/cuda/mlp_forward.cuh has the same rule)."""
    if mode == "hessian":
        return k * (k + 1) // 2
    return 1 if mode in SECOND_ORDER_MODES else 0


class SecondOrder:
    """The second-order rows a pass carries after its k tangent rows v_a, and how each layer's activation feeds
    them: ``q(tz)`` is the term act''(z) multiplies.

    Laplacian modes: one collapsed row, sum_a d²h/dv_a² (q = sum_a tz_a²): the Laplacian for the basis tangents,
    S times the Hutchinson mean for S noise tangents. Hessian: one row per pair a <= b, d²h/dv_a dv_b
    (q = tz_a * tz_b).
    """

    def __init__(self, mode: str, k: int, device):
        self.k, self.collapsed, self.n_rows = k, mode != "hessian", second_order_rows(mode, k)
        if self.collapsed:
            return
        self.first, self.second = torch.triu_indices(k, k, device=device)
        dense = torch.empty(k, k, dtype=torch.long, device=device)
        rows = torch.arange(self.n_rows, device=device)
        dense[self.first, self.second] = rows
        dense[self.second, self.first] = rows
        self.row_of_entry = dense.flatten()  # the row holding each entry (a, b) of a k x k Hessian

    def quadratic(self, tz: torch.Tensor) -> torch.Tensor:
        """q(tz) (n_rows, P or 1, n) from the tangent rows tz (k, P or 1, n)."""
        if self.collapsed:
            return (tz * tz).sum(0, keepdim=True)
        # triu_indices lists the pairs row by row: (a, a), (a, a+1), ... for each a, so no gathers are needed.
        return torch.cat([tz[a:a + 1] * tz[a:] for a in range(self.k)])

    def quadratic_adjoint(self, g_q: torch.Tensor, tz: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. tz (k, P, n) of <g_q, q(tz)>."""
        if self.collapsed:
            return 2 * g_q * tz
        g = g_q.new_zeros(self.k, *g_q.shape[1:])
        return g.index_add(0, self.first, g_q * tz[self.second]).index_add(0, self.second, g_q * tz[self.first])

    def hessian(self, s: torch.Tensor) -> torch.Tensor:
        """The (P, d_out, k, k) Hessians from the pair rows s (n_rows, P, d_out)."""
        n_points, d_out = s.shape[1:]
        return s[self.row_of_entry].view(self.k, self.k, n_points, d_out).permute(2, 3, 0, 1)

    def hessian_adjoint(self, g_hess: torch.Tensor) -> torch.Tensor:
        """Gradient w.r.t. the pair rows of <g_hess, hessian(s)>: each off-diagonal row gets both entries'."""
        n_points, d_out = g_hess.shape[:2]
        entries = g_hess.permute(2, 3, 0, 1).reshape(self.k * self.k, n_points, d_out)
        return entries.new_zeros(self.n_rows, n_points, d_out).index_add(0, self.row_of_entry, entries)


def second_order(mode: str, d_in: int, tangents: Optional[torch.Tensor], device) -> Optional[SecondOrder]:
    """The second-order rows of mode, or None for a first-order mode."""
    if mode not in SECOND_ORDER_MODES:
        return None
    return SecondOrder(mode, d_in if tangents is None else tangents.shape[-2], device)


def rows_per_point(mode: str, d_in: int, d_out: int, tangents: Optional[torch.Tensor]) -> int:
    """Rows each point carries through a layer's GEMM: the value, its tangents or cotangents, and any
    second-order rows."""
    if mode == "jacobian_reverse":
        return 1 + d_out
    k = d_in if tangents is None else tangents.shape[-2]
    return 1 + k + second_order_rows(mode, k)


def kept_shapes(mode: str, n_points: int, weights):
    """Shapes of what the forward keeps for the backward; [] if nothing. The reverse mode keeps each layer's
    pre-activation z, (1, P, out_i), then the d_out cotangent rows it carried back into each layer i > 0,
    (d_out, P, in_i) (``split_kept``).

    Its backward is a jvp pass whose tangents are J's cotangent: with z kept it multiplies just its tangent
    rows, which made an IGR-style 3-512x8-1 eikonal step 8-10% faster on a 2-core CPU
    (bench/bench_kept_states.py). Walking back, its tangent rows' cotangents are the forward's cotangent rows
    again (both start from e_j at the output and are scaled by the same slopes), so with those kept it carries
    back only the value row: one GEMM row per layer fewer, 6 GEMM passes per eikonal step instead of 7. The
    forward modes recompute: keeping their z (or all their rows) made the 3-128x4-3 Jacobian penalty step
    slower there in two tries, writing and reading the kept values costing more than the 128-wide GEMMs.
    """
    if mode != "jacobian_reverse":
        return []
    d_out = weights[-1].shape[0]
    return ([(1, n_points, w.shape[0]) for w in weights]
            + [(d_out, n_points, w_in.shape[0]) for w_in in weights[:-1]])


def split_kept(kept, n_layers: int):
    """(pre-activations z per layer, cotangent rows entering each layer i > 0 at index i - 1) of kept_shapes."""
    if kept is None:
        return None, None
    return kept[:n_layers], kept[n_layers:] or None


class LayerState(NamedTuple):
    rows: Optional[torch.Tensor]  # (1+k+m, P, n_h): [h; t; s] entering the layer, None for layer 0
    z: torch.Tensor               # (P, out) pre-activation
    tz: torch.Tensor              # (k+m, P, out) tangent and second-order rows before the activation
                                  # (layer 0: broadcast over P)


def _input_tangent_term(w_x: torch.Tensor, tangents: Optional[torch.Tensor]) -> torch.Tensor:
    """W_x applied to each tangent: (k, P, out). For basis tangents it is W_x^T, shared by all points (k, 1, out)."""
    if tangents is None:
        return w_x.t().unsqueeze(1)
    return tangents.transpose(0, 1) @ w_x.t()


def _stack_rows(head, tail, scale, differentiable):
    """[head; scale * tail] as one (1+k, P, n) tensor, the input of a layer's GEMMs (scale None means 1).

    head is (P, n); tail is (k, P, n) or (k, 1, n) when shared by all points.
    """
    if differentiable:
        scaled = tail if scale is None else scale * tail
        return torch.cat([head.unsqueeze(0), scaled.expand(tail.shape[0], *head.shape)], 0)
    # Below autograd, write both parts straight into one buffer: no concatenation copy.
    rows = head.new_empty(1 + tail.shape[0], *head.shape)
    rows[0] = head
    if scale is None:
        rows[1:] = tail
    else:
        torch.mul(scale, tail, out=rows[1:])
    return rows


def non_finite_points(inp: torch.Tensor, dims, keepdim: bool = False) -> torch.Tensor:
    """0 where a point's entries (over dims) are all finite, NaN where one is a NaN or an infinity.

    Added to the first layer's activation slope, it makes every tangent of such a point NaN (the generic
    path adds it to its results). Without it an infinite input saturating a Tanh would give J = 0.
    """
    return (inp - inp).sum(dims, keepdim=keepdim)


def _activation_terms(code, p0, p1, z, non_finite, orders):
    """The activation's value and derivatives of `orders` at z (act.derivatives, which shares their work).

    For Identity the derivatives are None: nothing to scale by, no curvature. The slope (order 1), which
    scales the tangents, is NaN at the first layer's non-finite points.
    """
    if code == act.Act.IDENTITY:
        terms = [z if n == 0 else None for n in orders]
    else:
        terms = list(act.derivatives(code, p0, p1, z, orders))
    if non_finite is not None and 1 in orders:
        at = orders.index(1)
        terms[at] = non_finite + 1 if terms[at] is None else terms[at] + non_finite
    return terms


def _with_curvature(rows, d2, q, differentiable):
    """rows (1+k+m or k+m, ...) with act''(z) * q(tz) added to their last m (second-order) rows; d2 None: none."""
    if d2 is None:
        return rows
    m = q.shape[0]
    if differentiable:
        return torch.cat([rows[:-m], rows[-m:] + d2 * q])
    rows[-m:].addcmul_(d2, q)
    return rows


def _propagate(x, cond, weights, biases, activations, activation_params, skip_layers, tangents, keep_states,
               differentiable, kept=None, second: Optional[SecondOrder] = None):
    """The output value h (P, d_out) and rows t (k+m, P, d_out): the k tangents, then the m second-order rows of
    `second` (none without), and each layer's state if asked for.

    kept: each layer's pre-activation z from the forward (kept_shapes), or None; with it only the tangent rows
    are multiplied.
    """
    n_points, d_in = x.shape
    inp = torch.cat([x, cond], 1) if cond.shape[1] else x
    non_finite = non_finite_points(inp, 1, keepdim=True)
    rows = z = tz = None
    k = d_in if tangents is None else tangents.shape[1]
    states: List[LayerState] = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        code, p0, p1 = activations[i], activation_params[2 * i], activation_params[2 * i + 1]
        known = None if kept is None else kept[i]
        if i == 0:
            z = torch.addmm(b, inp, w.t()) if known is None else known[0]
            tz = _input_tangent_term(w[:, :d_in], tangents)
            if second is not None:  # the input's second derivatives are 0 (0 * NaN slope keeps NaN points NaN)
                tz = torch.cat([tz, tz.new_zeros(second.n_rows, *tz.shape[1:])])
        else:
            n_h = rows.shape[2]
            src = rows if known is None else rows[1:]
            zr = src.reshape(-1, n_h) @ w[:, :n_h].t()  # one GEMM: the value row (unless kept), all tangent rows
            zr = zr.view(src.shape[0], n_points, w.shape[0])
            if known is None:
                z = zr[0].add_(b) if not differentiable else zr[0] + b
                tz = zr[1:]
            else:
                z, tz = known[0], zr
            if i in skip_layers:
                if known is None:
                    z = z + inp @ w[:, n_h:].t()
                x_term = _input_tangent_term(w[:, n_h:n_h + d_in], tangents)
                if second is None:
                    tz = tz + x_term
                else:  # x's second-order rows are 0
                    tz = torch.cat([tz[:k] + x_term, tz[k:]])
        if keep_states:
            states.append(LayerState(rows, z, tz))
        h, scale, *d2 = _activation_terms(code, p0, p1, z, non_finite if i == 0 else None,
                                          (0, 1) if second is None else (0, 1, 2))
        d2 = d2[0] if d2 else None
        q = None if d2 is None else second.quadratic(tz[:k])
        if i + 1 == len(weights):
            t = tz if scale is None else scale * tz
            return h, _with_curvature(t.expand(-1, n_points, -1), d2, q, True), states
        rows = _with_curvature(_stack_rows(h, tz, scale, differentiable), d2, q, differentiable)


def _pull_back(x, cond, weights, biases, activations, activation_params, skip_layers, keep=False):
    """The output value y (P, d_out), J (d_out, P, d_in) from d_out cotangent rows carried back, and with keep
    what kept_shapes lists: each layer's pre-activation z (P, out_i), then the cotangent rows (d_out, P, in_i)
    entering each layer i > 0; else []."""
    n_points, d_in = x.shape
    inp = torch.cat([x, cond], 1) if cond.shape[1] else x
    non_finite = non_finite_points(inp, 1, keepdim=True)
    h, slopes, pre = inp, [], []
    for i, (w, b) in enumerate(zip(weights, biases)):
        code, p0, p1 = activations[i], activation_params[2 * i], activation_params[2 * i + 1]
        n_h = h.shape[1]
        z = torch.addmm(b, h, w[:, :n_h].t())
        if i in skip_layers:
            z = z + inp @ w[:, n_h:].t()
        if keep:
            pre.append(z)
        h, slope = _activation_terms(code, p0, p1, z, non_finite if i == 0 else None, (0, 1))
        slopes.append(slope)
    d_out = h.shape[1]
    g = torch.eye(d_out, dtype=x.dtype, device=x.device).unsqueeze(1)  # (d_out, 1, d_out): e_j at every point
    jac = None
    cotangents = [None] * (len(weights) - 1)
    for i in reversed(range(len(weights))):
        w, slope = weights[i], slopes[i]
        g_z = (g if slope is None else g * slope).expand(d_out, n_points, w.shape[0])
        n_h = w.shape[1] - (inp.shape[1] if i in skip_layers else 0)  # layer 0: n_h is x's and cond's
        if i == 0 or i in skip_layers:  # the layer reads x: its W_x part adds to J
            x_cols = slice(0, d_in) if i == 0 else slice(n_h, n_h + d_in)
            term = g_z @ w[:, x_cols]
            jac = term if jac is None else jac + term
        if i > 0:
            g = g_z @ w[:, :n_h]
            cotangents[i - 1] = g
    return h, jac, pre + cotangents if keep else pre


def reduce_tangents(mode: str, t: torch.Tensor, tangents: Optional[torch.Tensor],
                    second: Optional[SecondOrder] = None) -> torch.Tensor:
    """The op's second output from the output rows t (k+m, P, d_out): tangents, then second-order rows."""
    if mode == "laplacian":
        return t[-1]
    if mode == "laplacian_hutchinson":
        return t[-1] / tangents.shape[1]
    if mode == "hessian":
        return second.hessian(t[second.k:])
    if mode == "jacobian":
        return t.permute(1, 2, 0)
    if mode == "divergence":
        return t.diagonal(0, 0, 2).sum(-1)
    if mode == "jvp":
        return t.transpose(0, 1)
    if mode == "hutchinson":
        return (t * tangents.transpose(0, 1)).sum(-1).mean(0)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _grad_of_tangents(mode: str, grad_out: torch.Tensor, tangents: Optional[torch.Tensor], d_out: int,
                      second: Optional[SecondOrder] = None) -> torch.Tensor:
    """Adjoint of reduce_tangents: the gradient w.r.t. t (k+m, P, d_out)."""
    if second is not None:  # the output depends on the second-order rows only
        if mode == "hessian":
            g_s = second.hessian_adjoint(grad_out)
        else:
            g_s = (grad_out if mode == "laplacian" else grad_out / tangents.shape[1]).unsqueeze(0)
        return torch.cat([g_s.new_zeros(second.k, *g_s.shape[1:]), g_s])
    if mode == "jacobian":
        return grad_out.permute(2, 0, 1)
    if mode == "divergence":
        eye = torch.eye(d_out, dtype=grad_out.dtype, device=grad_out.device)
        return grad_out[None, :, None] * eye[:, None, :]
    if mode == "jvp":
        return grad_out.transpose(0, 1)
    if mode == "hutchinson":
        return grad_out[None, :, None] * tangents.transpose(0, 1) / tangents.shape[1]
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def forward(mode, x, cond, weights, biases, activations, activation_params, skip_layers, tangents=None, *,
            differentiable=True, keep_into=None):
    """(y, out) of one op on flat rows. ``tangents`` is the jvp tangents or the Hutchinson noise.

    keep_into: tensors shaped as kept_shapes says, into which the forward writes what the backward reuses.
    ``differentiable=False`` lets the pass write into its buffers in place; the kernels use it below autograd.
    """
    if mode == "jacobian_reverse":
        y, jac, kept = _pull_back(x, cond, weights, biases, activations, activation_params, skip_layers,
                                  keep=keep_into is not None)
        for dst, value in zip(keep_into or (), kept):
            dst.copy_(value)
        return y, jac.transpose(0, 1)
    v = None if mode in BASIS_MODES else tangents
    second = second_order(mode, x.shape[1], v, x.device)
    y, t, _ = _propagate(x, cond, weights, biases, activations, activation_params, skip_layers,
                         v, keep_states=False, differentiable=differentiable, second=second)
    return y, reduce_tangents(mode, t, tangents, second)


class Grads(NamedTuple):
    x: torch.Tensor
    cond: torch.Tensor
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    tangents: Optional[torch.Tensor]  # jvp only


def backward(mode, grad_y, grad_out, x, cond, weights: Sequence[torch.Tensor], biases, activations,
             activation_params, skip_layers, tangents=None, *, differentiable=True, kept=None,
             kept_cotangents=None) -> Grads:
    """Gradients of <grad_y, y> + <grad_out, out> w.r.t. x, cond, weights, biases and jvp tangents.

    kept: what the forward kept (its keep_into), or None to recompute it. kept_cotangents (jvp, from the reverse
    mode): the cotangents of the tangent rows entering each layer i > 0, known, so only the value row is
    carried back.
    With ``differentiable=True`` (double backward) autograd can run through it; kept z would be constants
    there, cutting their dependence on x and the weights, so that takes none.
    """
    if differentiable and kept is not None:
        raise ValueError("reference.backward: kept pre-activations are constants to autograd; with "
                         "differentiable=True pass kept=None, so the forward is recomputed")
    if mode == "jacobian_reverse":  # <grad_out, J> = sum_j (J grad_out_j)_j: a jvp with one tangent per output
        d_out = grad_out.shape[1]
        eye = torch.eye(d_out, dtype=x.dtype, device=x.device).expand(x.shape[0], d_out, d_out)
        pre, cotangents = split_kept(kept, len(weights))
        g = backward("jvp", grad_y, eye, x, cond, weights, biases, activations, activation_params, skip_layers,
                     grad_out, differentiable=differentiable, kept=pre, kept_cotangents=cotangents)
        return g._replace(tangents=None)
    v = None if mode in BASIS_MODES else tangents
    n_points, d_in = x.shape
    second = second_order(mode, d_in, v, x.device)
    y, t, states = _propagate(x, cond, weights, biases, activations, activation_params, skip_layers,
                              v, keep_states=True, differentiable=differentiable, kept=kept, second=second)
    k = d_in if v is None else v.shape[1]
    inp = torch.cat([x, cond], 1) if cond.shape[1] else x
    non_finite = non_finite_points(inp, 1, keepdim=True)
    g_h = grad_y
    g_t = _grad_of_tangents(mode, grad_out, tangents, y.shape[1], second)
    g_inp = torch.zeros_like(inp)
    g_v = torch.zeros_like(v) if mode == "jvp" else None
    g_weights: List[torch.Tensor] = [None] * len(weights)
    g_biases: List[torch.Tensor] = [None] * len(weights)

    def input_grads(w_in, g_z, g_tz):
        """Gradient of layer weights reading cat([x, cond]) for the value row and W_x v for the tangent rows."""
        nonlocal g_inp, g_v
        g_w_in = g_z.t() @ inp
        g_w_x = g_tz.sum(1).t() if v is None else torch.einsum("kpo,pkd->od", g_tz, v)
        g_w_in = g_w_in + torch.nn.functional.pad(g_w_x, (0, inp.shape[1] - d_in))
        g_inp = g_inp + g_z @ w_in
        if g_v is not None:
            g_v = g_v + (g_tz @ w_in[:, :d_in]).transpose(0, 1)
        return g_w_in

    for i in reversed(range(len(weights))):
        w, state = weights[i], states[i]
        code, p0, p1 = activations[i], activation_params[2 * i], activation_params[2 * i + 1]
        d1, d2, *d3 = _activation_terms(code, p0, p1, state.z, non_finite if i == 0 else None,
                                        (1, 2) if second is None else (1, 2, 3))
        tangent_curvature = None
        g_z = g_h if d1 is None else g_h * d1
        if d2 is not None:
            g_z = g_z + (g_t * state.tz).sum(0) * d2
            if second is not None:  # s = d1 * sz + d2 * q(tz): q feeds z through d3 and tz through d2
                g_s, tz = g_t[k:], state.tz[:k]
                g_z = g_z + (g_s * second.quadratic(tz)).sum(0) * d3[0]
                tangent_curvature = d2 * second.quadratic_adjoint(g_s, tz)
        g_biases[i] = g_z.sum(0)
        g_rows = _stack_rows(g_z, g_t, d1, differentiable)  # [g_z; g_tz; g_sz], each tail row d1 * g_t
        if tangent_curvature is not None:
            if differentiable:
                g_rows = torch.cat([g_rows[:1], g_rows[1:1 + k] + tangent_curvature, g_rows[1 + k:]])
            else:
                g_rows[1:1 + k] += tangent_curvature
        g_tz = g_rows[1:1 + k]  # the second-order rows have no input term
        if i == 0:
            g_weights[i] = input_grads(w, g_z, g_tz)
            continue
        rows = state.rows
        n_h = rows.shape[2]
        g_rows = g_rows.view(-1, w.shape[0])
        g_w_h = g_rows.t() @ rows.view(-1, n_h)  # one GEMM over all rows
        if kept_cotangents is None:
            g_prev = (g_rows @ w[:, :n_h]).view(rows.shape)  # one GEMM over all rows
            g_h, g_t = g_prev[0], g_prev[1:]
        else:
            g_h, g_t = g_rows[:n_points] @ w[:, :n_h], kept_cotangents[i - 1]
        if i in skip_layers:
            g_weights[i] = torch.cat([g_w_h, input_grads(w[:, n_h:], g_z, g_tz)], 1)
        else:
            g_weights[i] = g_w_h
    return Grads(g_inp[:, :d_in], g_inp[:, d_in:], g_weights, g_biases, g_v)
