"""The reference math of the torchjac ops, in pure PyTorch, on flat rows of points.

Forward: tangent propagation. Every layer carries the rows ``[h; t_1..t_k]``
of each point through one GEMM, then the activation maps ``h <- act(z)`` and
``t <- act'(z) * tz``. With ``tangents=None`` the tangents are the ``d_in``
basis vectors, so ``t`` ends as the transposed Jacobian.

Backward: the hand-written reverse of that pass. It recomputes the forward,
keeping one layer state per layer, then walks back through the layers. It needs
the activations' second derivative, because ``t`` depends on ``z`` via ``act'``.

Both functions are built from differentiable ops only: the CPU kernels run them
as they are, and double backward is autograd through ``backward``.

Shapes: x (P, d_in), cond (P, c) (c may be 0), tangents (P, k, d_in) or None,
weights[i] (out_i, in_i), biases[i] (out_i,). Layer 0 reads ``cat([x, cond])``;
a skip layer reads ``cat([h, x, cond])``.
"""
from typing import List, NamedTuple, Optional, Sequence

import torch

from . import activations as act

MODES = ("jacobian", "divergence", "jvp", "hutchinson")


class LayerState(NamedTuple):
    rows: Optional[torch.Tensor]  # (P, 1+k, n_h): [h; t] entering the layer, None for layer 0
    z: torch.Tensor               # (P, out) pre-activation
    tz: torch.Tensor              # (P, k, out) tangents before the activation


def _input_tangent_term(w_x: torch.Tensor, tangents: Optional[torch.Tensor], n_points: int) -> torch.Tensor:
    """W_x applied to each tangent: (P, k, out). For basis tangents it is W_x^T, shared by all points."""
    if tangents is None:
        return w_x.t().unsqueeze(0).expand(n_points, -1, -1)
    return tangents @ w_x.t()


def _propagate(x, cond, weights, biases, activations, activation_params, skip_layers, tangents, keep_states):
    n_points, d_in = x.shape
    inp = torch.cat([x, cond], 1) if cond.shape[1] else x
    h = t = None
    states: List[LayerState] = []
    for i, (w, b) in enumerate(zip(weights, biases)):
        if i == 0:
            rows = None
            z = torch.addmm(b, inp, w.t())
            tz = _input_tangent_term(w[:, :d_in], tangents, n_points)
        else:
            n_h = h.shape[1]
            rows = torch.cat([h.unsqueeze(1), t], 1)
            zr = rows @ w[:, :n_h].t()  # one GEMM for the value row and all tangent rows
            z = zr[:, 0] + b
            tz = zr[:, 1:]
            if i in skip_layers:
                z = z + inp @ w[:, n_h:].t()
                tz = tz + _input_tangent_term(w[:, n_h:n_h + d_in], tangents, n_points)
        if keep_states:
            states.append(LayerState(rows, z, tz))
        code, p0, p1 = activations[i], activation_params[2 * i], activation_params[2 * i + 1]
        if code == act.Act.IDENTITY:
            h, t = z, tz
        else:
            h = act.value(code, p0, p1, z)
            t = act.derivative(code, p0, p1, z).unsqueeze(1) * tz
    return h, t, states


def reduce_tangents(mode: str, t: torch.Tensor, tangents: Optional[torch.Tensor]) -> torch.Tensor:
    """The op's second output from the output tangents t (P, k, d_out)."""
    if mode == "jacobian":
        return t.transpose(1, 2)
    if mode == "divergence":
        return t.diagonal(0, 1, 2).sum(-1)
    if mode == "jvp":
        return t
    if mode == "hutchinson":
        return (t * tangents).sum(-1).mean(-1)
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def _grad_of_tangents(mode: str, grad_out: torch.Tensor, tangents: Optional[torch.Tensor], d_out: int) -> torch.Tensor:
    """Adjoint of reduce_tangents: the gradient w.r.t. t (P, k, d_out)."""
    if mode == "jacobian":
        return grad_out.transpose(1, 2)
    if mode == "divergence":
        eye = torch.eye(d_out, dtype=grad_out.dtype, device=grad_out.device)
        return grad_out[:, None, None] * eye
    if mode == "jvp":
        return grad_out
    if mode == "hutchinson":
        return grad_out[:, None, None] * tangents / tangents.shape[1]
    raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")


def forward(mode, x, cond, weights, biases, activations, activation_params, skip_layers, tangents=None):
    """(y, out) of one op on flat rows. ``tangents`` is the jvp tangents or the Hutchinson noise."""
    basis = mode in ("jacobian", "divergence")
    y, t, _ = _propagate(x, cond, weights, biases, activations, activation_params, skip_layers,
                         None if basis else tangents, keep_states=False)
    return y, reduce_tangents(mode, t, tangents)


class Grads(NamedTuple):
    x: torch.Tensor
    cond: torch.Tensor
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    tangents: Optional[torch.Tensor]  # jvp only


def backward(mode, grad_y, grad_out, x, cond, weights: Sequence[torch.Tensor], biases, activations,
             activation_params, skip_layers, tangents=None) -> Grads:
    """Gradients of <grad_y, y> + <grad_out, out> w.r.t. x, cond, weights, biases and jvp tangents."""
    basis = mode in ("jacobian", "divergence")
    v = None if basis else tangents
    y, t, states = _propagate(x, cond, weights, biases, activations, activation_params, skip_layers,
                              v, keep_states=True)
    n_points, d_in = x.shape
    inp = torch.cat([x, cond], 1) if cond.shape[1] else x
    g_h = grad_y
    g_t = _grad_of_tangents(mode, grad_out, tangents, y.shape[1])
    g_inp = torch.zeros_like(inp)
    g_v = torch.zeros_like(v) if mode == "jvp" else None
    g_weights: List[torch.Tensor] = [None] * len(weights)
    g_biases: List[torch.Tensor] = [None] * len(weights)

    def input_grads(w_in, g_z, g_tz):
        """Gradient of layer weights reading cat([x, cond]) for the value row and W_x v for the tangent rows."""
        nonlocal g_inp, g_v
        g_w_in = g_z.t() @ inp
        g_w_x = g_tz.sum(0).t() if v is None else torch.einsum("pko,pkd->od", g_tz, v)
        g_w_in = g_w_in + torch.nn.functional.pad(g_w_x, (0, inp.shape[1] - d_in))
        g_inp = g_inp + g_z @ w_in
        if g_v is not None:
            g_v = g_v + g_tz @ w_in[:, :d_in]
        return g_w_in

    for i in reversed(range(len(weights))):
        w, state = weights[i], states[i]
        code, p0, p1 = activations[i], activation_params[2 * i], activation_params[2 * i + 1]
        if code == act.Act.IDENTITY:
            g_z, g_tz = g_h, g_t
        else:
            d1 = act.derivative(code, p0, p1, state.z)
            d2 = act.second_derivative(code, p0, p1, state.z)
            g_z = g_h * d1 + (g_t * state.tz).sum(1) * d2
            g_tz = d1.unsqueeze(1) * g_t
        g_biases[i] = g_z.sum(0)
        if i == 0:
            g_weights[i] = input_grads(w, g_z, g_tz)
            continue
        n_h = state.rows.shape[2]
        g_rows = torch.cat([g_z.unsqueeze(1), g_tz], 1)
        g_w_h = g_rows.flatten(0, 1).t() @ state.rows.flatten(0, 1)  # one GEMM over all rows
        g_prev = g_rows @ w[:, :n_h]                                    # one GEMM over all rows
        g_h, g_t = g_prev[:, 0], g_prev[:, 1:]
        if i in skip_layers:
            g_weights[i] = torch.cat([g_w_h, input_grads(w[:, n_h:], g_z, g_tz)], 1)
        else:
            g_weights[i] = g_w_h
    return Grads(g_inp[:, :d_in], g_inp[:, d_in:], g_weights, g_biases, g_v)
