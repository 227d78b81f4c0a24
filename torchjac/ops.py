"""Registration of the torchjac ops: pure-PyTorch kernels, fake (shape) functions and autograd.

The schemas live in csrc/ops.cpp. For every mode there is a forward op
``mlp_<mode>`` and a backward op ``mlp_<mode>_backward``:

- the pure-PyTorch kernels (torchjac/kernels.py) are registered under
  CompositeExplicitAutograd, so they serve every device that has no fused
  kernel; fused CUDA kernels register under CUDA and take precedence;
- the forward op's autograd calls the backward op, passing it the forward's
  ``states`` (keep_states): what the backward reuses instead of recomputing. The
  pure-PyTorch reverse mode keeps its layers' pre-activations; the other modes
  and the fused kernels return ``states`` empty and recompute;
- the backward op's autograd (double backward) is autograd through the
  reference reverse pass, torchjac/reference.py.
"""
import functools

import torch

from . import _C  # noqa: F401  (loads the schemas)
from . import kernels, reference
from .activations import Act
from .kernels import FlatPoints, output_shape

# Extra tensor input of each mode, after the MLP arguments.
EXTRA_INPUT = {"jacobian": None, "divergence": None, "jvp": "tangents", "hutchinson": "noise",
               "jacobian_reverse": None, "laplacian": None, "laplacian_hutchinson": "noise", "hessian": None}
MODES = reference.MODES
assert tuple(EXTRA_INPUT) == MODES
_ACTIVATION_CODES = {int(a) for a in Act}
# Only jvp tangents are differentiated; the Hutchinson noise is a constant.
_DIFFERENTIABLE_EXTRA = {"jvp"}


def forward_op(mode):
    return getattr(torch.ops.torchjac, f"mlp_{mode}").default


def backward_op(mode):
    return getattr(torch.ops.torchjac, f"mlp_{mode}_backward").default


def check_mlp_args(op, x, cond, weights, biases, activations, activation_params, skip_layers, extra=None, *,
                   mode):
    """Raise a ValueError naming the argument for any inconsistency of an op's MLP arguments."""
    def fail(msg):
        raise ValueError(f"torchjac.{op}: {msg}")

    if x.dim() < 1:
        fail("x: expected shape (..., d_in), got a 0-dim tensor")
    if cond.dim() != x.dim():
        fail(f"cond: expected {x.dim()} dims like x (leading dims equal to x's or 1), got shape {tuple(cond.shape)}")
    for i, (c, n) in enumerate(zip(cond.shape[:-1], x.shape[:-1])):
        if c != n and c != 1:
            fail(f"cond: dim {i} is {c}, expected {n} (x's) or 1; x shape {tuple(x.shape)}, "
                 f"cond shape {tuple(cond.shape)}")
    n_layers = len(weights)
    if n_layers == 0:
        fail("weights: expected at least one layer, got none")
    if len(biases) != n_layers or len(activations) != n_layers or len(activation_params) != 2 * n_layers:
        fail(f"expected one bias, one activation and two activation_params per layer for {n_layers} layers, got "
             f"{len(biases)} biases, {len(activations)} activations, {len(activation_params)} activation_params")
    unknown = [a for a in activations if a not in _ACTIVATION_CODES]
    if unknown:
        fail(f"activations: expected codes in {sorted(_ACTIVATION_CODES)} (torchjac.activations.Act), got {unknown}")
    for s in skip_layers:
        if not 0 < s < n_layers:
            fail(f"skip_layers: expected indices in [1, {n_layers - 1}], got {list(skip_layers)}")
    d_in, c = x.shape[-1], cond.shape[-1]
    expected_in = d_in + c
    for i, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2:
            fail(f"weights[{i}]: expected a 2-dim (out, in) tensor, got shape {tuple(w.shape)}")
        if i in skip_layers:
            expected_in = expected_in + d_in + c
        if w.shape[1] != expected_in:
            fail(f"weights[{i}]: expected {expected_in} input features, got shape {tuple(w.shape)}")
        if tuple(b.shape) != (w.shape[0],):
            fail(f"biases[{i}]: expected shape ({w.shape[0]},), got {tuple(b.shape)}")
        expected_in = w.shape[0]
    for name, t in [("cond", cond)] + [(f"weights[{i}]", w) for i, w in enumerate(weights)] + \
            [(f"biases[{i}]", b) for i, b in enumerate(biases)] + ([(EXTRA_INPUT[mode], extra)] if extra is not None else []):
        if t.dtype != x.dtype:
            fail(f"{name}: expected dtype {x.dtype} like x, got {t.dtype}")
        if t.device != x.device:
            fail(f"{name}: expected device {x.device} like x, got {t.device}")
    d_out = weights[-1].shape[0]
    if mode in ("divergence", "hutchinson") and d_out != d_in:
        fail(f"divergence needs d_out == d_in, got d_in={d_in}, d_out={d_out}")
    if extra is not None:
        if extra.dim() != x.dim() + 1 or tuple(extra.shape[:-2]) != tuple(x.shape[:-1]) or extra.shape[-1] != d_in:
            fail(f"{EXTRA_INPUT[mode]}: expected shape {(*x.shape[:-1], 'k', d_in)}, got {tuple(extra.shape)}")


def _check_kernel_dtype(op, x):
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"torchjac.{op}: the pure-PyTorch path supports float32 and float64, got x of dtype "
                        f"{x.dtype}; convert with x.float() (the model too) or use a fused CUDA kernel")


# ---- the pieces every op is registered from; `op` names the op in errors

def _forward_kernel(op, mode, x, cond, weights, biases, activations, activation_params, skip_layers, *extra,
                    keep_states):
    check_mlp_args(op, x, cond, weights, biases, activations, activation_params, skip_layers, *extra, mode=mode)
    _check_kernel_dtype(op, x)
    return kernels.forward(mode, x, cond, weights, biases, activations, activation_params, skip_layers, *extra,
                           keep_states=keep_states)


def _forward_fake(op, mode, x, cond, weights, biases, activations, activation_params, skip_layers, *extra,
                  keep_states):
    check_mlp_args(op, x, cond, weights, biases, activations, activation_params, skip_layers, *extra, mode=mode)
    lead, d_out = x.shape[:-1], weights[-1].shape[0]
    tangents = extra[0] if extra else None
    # Only the pure-PyTorch reverse mode keeps states, and no fused kernel serves that mode.
    n_states = kernels.states_size(mode, x, weights) if keep_states else 0
    return (x.new_empty((*lead, d_out)), x.new_empty(output_shape(mode, lead, x.shape[-1], d_out, tangents)),
            x.new_empty(n_states))


def _check_states(op, mode, x, weights, states):
    """states: None, empty (recompute) or the forward's own, with as many elements as it keeps."""
    if states is None or states.numel() == 0:
        return
    expected = kernels.states_size(mode, x, weights)
    if states.dim() != 1 or states.numel() != expected or states.dtype != x.dtype or states.device != x.device:
        raise ValueError(f"torchjac.{op}: states expected the forward op's states, a 1-dim {x.dtype} tensor of "
                         f"{expected} elements on {x.device}, or None; got shape {tuple(states.shape)}, "
                         f"dtype {states.dtype} on {states.device}")


def _backward_kernel(op, mode, grad_y, grad_out, x, cond, weights, biases, activations, activation_params,
                     skip_layers, *extra, states):
    check_mlp_args(op, x, cond, weights, biases, activations, activation_params, skip_layers, *extra, mode=mode)
    _check_kernel_dtype(op, x)
    _check_states(op, mode, x, weights, states)
    return kernels.backward(mode, grad_y, grad_out, x, cond, weights, biases, activations, activation_params,
                            skip_layers, *extra, states=states)


def _backward_fake(op, mode, grad_y, grad_out, x, cond, weights, biases, activations, activation_params,
                   skip_layers, *extra, states):
    check_mlp_args(op, x, cond, weights, biases, activations, activation_params, skip_layers, *extra, mode=mode)
    _check_states(op, mode, x, weights, states)
    # The kernels return contiguous gradients.
    grads = (x.new_empty(x.shape), cond.new_empty(cond.shape), [w.new_empty(w.shape) for w in weights],
             [b.new_empty(b.shape) for b in biases])
    if mode in _DIFFERENTIABLE_EXTRA:
        grads += (extra[0].new_empty(extra[0].shape),)
    return grads


def _save(ctx, mode, leading, weights, biases, static, extra, states=None):
    """Saves an op's tensors for its backward; `leading` are the tensors before the weights."""
    ctx.mode, ctx.n_leading, ctx.n_layers = mode, len(leading), len(weights)
    ctx.mlp = tuple(list(a) for a in static)  # activations, activation_params, skip_layers
    ctx.has_states = states is not None
    ctx.save_for_backward(*leading, *weights, *biases, *extra, *([states] if ctx.has_states else []))


def _load(ctx):
    """(leading tensors, weights, biases, extra tensors, states or None) saved by _save."""
    saved, n, m = ctx.saved_tensors, ctx.n_leading, ctx.n_layers
    states = saved[-1] if ctx.has_states else None
    extra = saved[n + 2 * m:len(saved) - ctx.has_states]
    return saved[:n], list(saved[n:n + m]), list(saved[n + m:n + 2 * m]), extra, states


def _extra_grad(mode, grad):
    """Gradient for a mode's extra input: the jvp tangents get one, the Hutchinson noise none."""
    return (grad if mode in _DIFFERENTIABLE_EXTRA else None,) if EXTRA_INPUT[mode] is not None else ()


def _as_passed(backward):
    """backward's gradients for the arguments the call passed: the dispatcher drops trailing arguments equal
    to their default (keep_states, states), and autograd wants one gradient per argument passed."""
    def call(ctx, *grads):
        return tuple(backward(ctx, *grads)[:len(ctx.needs_input_grad)])
    return call


def _forward_backward(ctx, grad_y, grad_out, _grad_states=None):
    """Gradients of a forward op: (x, cond, weights, biases, static args..., extra, keep_states)."""
    (x, cond), weights, biases, extra, states = _load(ctx)
    grads = backward_op(ctx.mode)(grad_y, grad_out, x, cond, weights, biases, *ctx.mlp, *extra, states)
    return (grads[0], grads[1], list(grads[2]), list(grads[3]), *_no_grad(ctx.mlp),
            *_extra_grad(ctx.mode, grads[4] if len(grads) > 4 else None), None)


def _backward_backward(ctx, gg_x, gg_cond, gg_weights, gg_biases, *gg_extra):
    """Gradients of a backward op: (grad_y, grad_out, x, cond, weights, biases, static args..., extra, states)."""
    (grad_y, grad_out, x, cond), weights, biases, extra, _ = _load(ctx)
    gy, gout, gx, gcond, gw, gb, *g_extra = double_backward(
        ctx.mode, ctx.mlp, (grad_y, grad_out, x, cond, weights, biases, *extra),
        (gg_x, gg_cond, gg_weights, gg_biases, *gg_extra))
    return (gy, gout, gx, gcond, gw, gb, *_no_grad(ctx.mlp), *_extra_grad(ctx.mode, g_extra[0] if g_extra else None),
            None)


def _schema_arguments(op):
    return getattr(torch.ops.torchjac, op).default._schema.arguments


def _with_trailing(fn, op):
    """fn(*args, <last>=...) for the schema of op, whose last argument (keep_states or states) has a default:
    the dispatcher passes it positionally, or drops it when it equals the default."""
    arguments = _schema_arguments(op)
    n_args, last = len(arguments) - 1, arguments[-1]

    def call(*args):
        return fn(*args[:n_args], **{last.name: args[n_args] if len(args) > n_args else last.default_value})
    return call


def _register(mode):
    name, bwd_name = f"mlp_{mode}", f"mlp_{mode}_backward"

    def fwd_setup(ctx, inputs, output):
        x, cond, weights, biases, *static_and_extra, _keep_states = inputs
        ctx.mark_non_differentiable(output[2])
        _save(ctx, mode, (x, cond), weights, biases, static_and_extra[:3], static_and_extra[3:], output[2])

    def bwd_setup(ctx, inputs, output):
        grad_y, grad_out, x, cond, weights, biases, *static_and_extra, _states = inputs
        _save(ctx, mode, (grad_y, grad_out, x, cond), weights, biases, static_and_extra[:3], static_and_extra[3:])

    for op, kernel, fake, backward, setup in (
            (name, _forward_kernel, _forward_fake, _forward_backward, fwd_setup),
            (bwd_name, _backward_kernel, _backward_fake, _backward_backward, bwd_setup)):
        torch.library.impl(f"torchjac::{op}", "CompositeExplicitAutograd")(
            _with_trailing(functools.partial(kernel, op, mode), op))
        torch.library.register_fake(f"torchjac::{op}")(_with_trailing(functools.partial(fake, op, mode), op))
        torch.library.register_autograd(f"torchjac::{op}", _as_passed(backward), setup_context=setup)


def _no_grad(static_args):
    """Backward results for the non-tensor arguments; autograd wants [] for an empty list."""
    return tuple([] if isinstance(a, (list, tuple)) and len(a) == 0 else None for a in static_args)


def _dot(a, b):
    return 0 if a is None or b is None else (a * b).sum()


def double_backward(mode, mlp, inputs, cotangents):
    """VJP of a backward op: autograd through the reference reverse pass, chunk by chunk.

    inputs are the backward op's tensors (grad_y, grad_out, x, cond, weights, biases[, tangents]),
    cotangents those of its outputs (grad_x, grad_cond, grad_weights, grad_biases[, grad_tangents]).
    The result is not differentiable again.
    """
    if torch.is_grad_enabled():
        raise RuntimeError("torchjac: third-order derivatives through the torchjac ops are not supported "
                           "(create_graph=True on a gradient of a gradient of jacobian/divergence/jvp)")
    activations, activation_params, skip_layers = mlp
    grad_y, grad_out, x, cond, weights, biases, *extra = inputs
    gg_x, gg_cond, gg_weights, gg_biases, *gg_extra = cotangents
    differentiable = mode in _DIFFERENTIABLE_EXTRA
    tangents = extra[0] if extra else None
    points = FlatPoints(x, cond)
    d_in, d_out = x.shape[-1], weights[-1].shape[0]
    flat_out_shape = output_shape(mode, (points.n,), d_in, d_out, tangents)
    grad_y, grad_out = grad_y.reshape(points.n, d_out), grad_out.reshape(flat_out_shape)
    flat_tangents = None if tangents is None else tangents.reshape(points.n, *tangents.shape[-2:])
    gg_x = None if gg_x is None else gg_x.reshape(points.n, d_in)
    gg_cond = None if gg_cond is None else FlatPoints(x, gg_cond)  # a cotangent per cond row of each point
    gg_tangents = gg_extra[0].reshape(flat_tangents.shape) if differentiable and gg_extra[0] is not None else None

    result = [x.new_zeros(points.n, d_out), x.new_zeros(flat_out_shape), x.new_zeros(points.x.shape),
              cond.new_zeros(points.cond.shape)]
    result_w, result_b = [torch.zeros_like(w) for w in weights], [torch.zeros_like(b) for b in biases]
    result_t = x.new_zeros(flat_tangents.shape) if differentiable else None
    with torch.enable_grad():
        w_leaves = [w.detach().requires_grad_() for w in weights]
        b_leaves = [b.detach().requires_grad_() for b in biases]
        for rows in points.chunks(kernels.rows_per_chunk(mode, x, weights, tangents)):
            row_leaves = [t.detach().requires_grad_() for t in
                          (grad_y[rows], grad_out[rows], points.x[rows], points.cond_rows(rows))]
            t_rows = None if flat_tangents is None else flat_tangents[rows].detach().requires_grad_(differentiable)
            g = reference.backward(mode, *row_leaves, w_leaves, b_leaves, activations, activation_params,
                                   skip_layers, t_rows)
            total = (_dot(g.x, None if gg_x is None else gg_x[rows])
                     + _dot(g.cond, None if gg_cond is None else gg_cond.cond_rows(rows))
                     + sum(_dot(a, b) for a, b in zip(g.weights + g.biases, list(gg_weights) + list(gg_biases)))
                     + _dot(g.tangents, None if gg_tangents is None else gg_tangents[rows]))
            leaves = row_leaves + w_leaves + b_leaves + ([t_rows] if differentiable else [])
            if not torch.is_tensor(total) or not total.requires_grad:
                continue
            grads = torch.autograd.grad(total, leaves, allow_unused=True)
            for i, gr in enumerate(grads[:3]):
                if gr is not None:
                    result[i][rows] = gr
            if grads[3] is not None:
                points.add_cond_grad(result[3], rows, grads[3])
            for acc, gr in zip(result_w + result_b, grads[4:4 + 2 * len(weights)]):
                if gr is not None:
                    acc += gr
            if differentiable and grads[-1] is not None:
                result_t[rows] = grads[-1]
    out = [result[0].view(inputs[0].shape), result[1].view(inputs[1].shape), result[2].view(x.shape),
           result[3].view(cond.shape), result_w, result_b]
    if differentiable:
        out.append(result_t.view(tangents.shape))
    return out


def _reference_extra(op, mode, tangents):
    """The extra inputs of `mode` for the reference ops, which take the tangents as an optional."""
    if mode not in EXTRA_INPUT:
        raise ValueError(f"torchjac.{op}: mode expected one of {MODES}, got {mode!r}")
    needs = EXTRA_INPUT[mode] is not None
    if needs != (tangents is not None):
        raise ValueError(f"torchjac.{op}: mode {mode!r} {'needs' if needs else 'takes no'} tangents")
    return (tangents,) if needs else ()


def _register_reference_ops():
    """mlp_reference_forward/backward: the pure-PyTorch kernels by mode, for fused kernels to fall back on.
    Below autograd they run the pure-PyTorch kernels directly, never a fused one."""
    fwd, bwd = "mlp_reference_forward", "mlp_reference_backward"

    def fwd_kernel(mode, *args, tangents, keep_states):
        return _forward_kernel(fwd, mode, *args, *_reference_extra(fwd, mode, tangents), keep_states=keep_states)

    def fwd_fake(mode, *args, tangents, keep_states):
        return _forward_fake(fwd, mode, *args, *_reference_extra(fwd, mode, tangents), keep_states=keep_states)

    def bwd_kernel(mode, *args, tangents, states):
        grads = _backward_kernel(bwd, mode, *args, *_reference_extra(bwd, mode, tangents), states=states)
        return (*grads[:4], grads[4] if len(grads) > 4 else args[2].new_empty(0))

    def bwd_fake(mode, *args, tangents, states):
        grads = _backward_fake(bwd, mode, *args, *_reference_extra(bwd, mode, tangents), states=states)
        return (*grads[:4], grads[4] if len(grads) > 4 else args[2].new_empty(0))

    def fwd_setup(ctx, inputs, output):
        mode, x, cond, weights, biases, *static, tangents, _keep_states = inputs
        ctx.mark_non_differentiable(output[2])
        _save(ctx, mode, (x, cond), weights, biases, static, () if tangents is None else (tangents,), output[2])

    def bwd_setup(ctx, inputs, output):
        mode, grad_y, grad_out, x, cond, weights, biases, *static, tangents, _states = inputs
        _save(ctx, mode, (grad_y, grad_out, x, cond), weights, biases, static,
              () if tangents is None else (tangents,))

    # Where tangents sit among the per-mode op's arguments, which have no mode.
    tangents_at = {op: [a.name for a in _schema_arguments(op)].index("tangents") - 1 for op in (fwd, bwd)}

    def reference_grads(op, ctx, grads):
        """(mode's, *grads of the per-mode op), with the tangents' (None) where the mode has none."""
        if EXTRA_INPUT[ctx.mode] is None:
            grads = (*grads[:tangents_at[op]], None, *grads[tangents_at[op]:])
        return (None, *grads)

    def fwd_backward(ctx, grad_y, grad_out, _grad_states=None):
        return reference_grads(fwd, ctx, _forward_backward(ctx, grad_y, grad_out))

    def bwd_backward(ctx, gg_x, gg_cond, gg_weights, gg_biases, gg_tangents):
        gg_extra = (gg_tangents,) if ctx.mode in _DIFFERENTIABLE_EXTRA else ()
        return reference_grads(bwd, ctx, _backward_backward(ctx, gg_x, gg_cond, gg_weights, gg_biases, *gg_extra))

    def tangents_by_name(fn):
        """The schemas pass tangents positionally, just before the trailing argument."""
        return lambda mode, *args, **trailing: fn(mode, *args[:-1], tangents=args[-1], **trailing)

    for op, kernel, fake, backward, setup in ((fwd, fwd_kernel, fwd_fake, fwd_backward, fwd_setup),
                                               (bwd, bwd_kernel, bwd_fake, bwd_backward, bwd_setup)):
        torch.library.impl(f"torchjac::{op}", "CompositeExplicitAutograd")(_with_trailing(tangents_by_name(kernel), op))
        torch.library.register_fake(f"torchjac::{op}")(_with_trailing(tangents_by_name(fake), op))
        torch.library.register_autograd(f"torchjac::{op}", _as_passed(backward), setup_context=setup)


for _mode in MODES:
    _register(_mode)
_register_reference_ops()
