"""The fused CUDA backward kernels (csrc/cuda/mlp_backward.cu) against an autograd oracle.

The oracle is built here from the same weights: a float64 MLP written with
torch.nn.functional, whose Jacobian comes from the create_graph autograd loop
and whose gradients come from one more autograd.grad. It shares no code with
torchjac. The backward ops are called directly through torch.ops.torchjac, and
training goes through the public API. Every call made through `fused` also
asserts that no fused kernel fell back to the reference path. The whole module
runs on a CUDA device or, with TORCHJAC_EMULATE_CUDA=1, in the host emulation of the
kernels (tests/cuda_backend.py).
"""
import math
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck

import torchjac
from cuda_backend import DEVICE, needs_real_gpu, requires_kernels
from test_cuda_forward import ACTIVATION_CASES, ORACLE_ACTIVATIONS, fallback_messages, max_rel_err

pytestmark = requires_kernels
MODES = ["jacobian", "divergence", "jvp", "hutchinson"]
TEMPLATE_WIDTHS = [16, 32, 64, 128, 256]
DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]
FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-5
SOFTPLUS = (3, 1.0, 20.0)
IDENTITY = (0, 0.0, 0.0)


class Mlp:
    """An MLP as the ops take it: weight and bias lists, activation codes and parameters, skip layers."""

    def __init__(self, weights, biases, activations, params, skips):
        self.weights, self.biases, self.activations = weights, biases, activations
        self.params, self.skips = params, skips

    def args(self):
        return self.weights, self.biases, self.activations, self.params, self.skips


def make_mlp(d_in, d_out, hidden, c=0, act=SOFTPLUS, last_act=IDENTITY, skips=(), dtype=torch.float64, seed=0):
    """Random weights, drawn in float64 on the CPU and then cast, so every dtype sees the same MLP."""
    gen = torch.Generator().manual_seed(seed)
    weights, biases, activations, params = [], [], [], []
    prev = 0
    widths = list(hidden) + [d_out]
    for layer, out in enumerate(widths):
        fan_in = (prev if layer else 0) + (d_in + c if layer == 0 or layer in skips else 0)
        w = torch.randn(out, fan_in, generator=gen, dtype=torch.float64) * (1.5 / math.sqrt(fan_in))
        b = 0.2 * torch.randn(out, generator=gen, dtype=torch.float64)
        code, p0, p1 = last_act if layer == len(widths) - 1 else act
        weights.append(w.to(DEVICE, dtype))
        biases.append(b.to(DEVICE, dtype))
        activations.append(code)
        params += [p0, p1]
        prev = out
    return Mlp(weights, biases, activations, params, list(skips))


def points(*shape, d_in, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, d_in, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def no_cond(x):
    return x.new_zeros(*x.shape[:-1], 0)


def extra_input(mode, x, k, seed=9):
    """The jvp tangents, or Rademacher noise for Hutchinson; None for the other modes."""
    lead, d_in = x.shape[:-1], x.shape[-1]
    if mode == "jvp":
        return points(*lead, k, d_in=d_in, dtype=x.dtype, seed=seed)
    if mode == "hutchinson":
        gen = torch.Generator().manual_seed(seed)
        return (torch.randint(0, 2, (*lead, k, d_in), generator=gen) * 2 - 1).to(DEVICE, x.dtype)
    return None


def reduce_jacobian(mode, jac, extra):
    """The op's second output from J (..., d_out, d_in)."""
    if mode == "jacobian":
        return jac
    if mode == "divergence":
        return jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    if mode == "jvp":
        return torch.einsum("...ij,...kj->...ki", jac, extra)
    return torch.einsum("...si,...ij,...sj->...", extra, jac, extra) / extra.shape[-2]


def oracle_grads(mode, mlp, x, cond, grad_y, grad_out, extra, dtype=torch.float64):
    """Gradients of <grad_y, y> + <grad_out, out> w.r.t. x, cond, weights, biases (and jvp tangents), in `dtype`.

    J comes from the create_graph autograd loop over the outputs; cond is expanded
    inside the model, so its gradient sums over the points that share a row.
    """
    def as_leaf(t, grad=True):
        return t.detach().to(dtype).requires_grad_(grad)

    xs, cs = as_leaf(x), as_leaf(cond)
    ws, bs = [as_leaf(w) for w in mlp.weights], [as_leaf(b) for b in mlp.biases]
    es = None if extra is None else as_leaf(extra, mode == "jvp")
    lead = x.shape[:-1]
    c_full = cs.expand(*lead, cond.shape[-1])
    with torch.enable_grad():
        h = None
        for layer, (w, b) in enumerate(zip(ws, bs)):
            if layer == 0:
                inp = torch.cat([xs, c_full], -1)
            elif layer in mlp.skips:
                inp = torch.cat([h, xs, c_full], -1)
            else:
                inp = h
            code = mlp.activations[layer]
            h = ORACLE_ACTIVATIONS[code](F.linear(inp, w, b), mlp.params[2 * layer], mlp.params[2 * layer + 1])
        y = h
        rows = [torch.autograd.grad(y[..., i].sum(), xs, create_graph=True)[0] for i in range(y.shape[-1])]
        out = reduce_jacobian(mode, torch.stack(rows, -2), es)
        total = (grad_y.detach().to(dtype) * y).sum() + (grad_out.detach().to(dtype) * out).sum()
        leaves = [xs, cs, *ws, *bs] + ([es] if mode == "jvp" else [])
        grads = torch.autograd.grad(total, leaves, allow_unused=True)
    grads = [torch.zeros_like(leaf) if g is None else g for g, leaf in zip(grads, leaves)]
    n = len(ws)
    result = {"grad_x": grads[0], "grad_cond": grads[1]}
    result.update({f"grad_weights[{i}]": g for i, g in enumerate(grads[2:2 + n])})
    result.update({f"grad_biases[{i}]": g for i, g in enumerate(grads[2 + n:2 + 2 * n])})
    if mode == "jvp":
        result["grad_tangents"] = grads[-1]
    return result


def fused(op_name, *args):
    """Calls torch.ops.torchjac.<op_name> and fails if a fused kernel fell back to the reference path."""
    prev = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # TORCH_WARN_ONCE warns on every call
    try:
        with fallback_messages() as fell_back:
            out = getattr(torch.ops.torchjac, op_name)(*args)
    finally:
        torch.set_warn_always(prev)
    assert not fell_back, f"{op_name} fell back to the reference path: {fell_back[0]}"
    return out


def named_grads(mode, grads, n_layers):
    result = {"grad_x": grads[0], "grad_cond": grads[1]}
    result.update({f"grad_weights[{i}]": g for i, g in enumerate(grads[2])})
    result.update({f"grad_biases[{i}]": g for i, g in enumerate(grads[3])})
    assert len(grads[2]) == len(grads[3]) == n_layers
    if mode == "jvp":
        result["grad_tangents"] = grads[4]
    else:
        assert len(grads) == 4
    return result


def fused_backward(mode, mlp, x, cond, grad_y, grad_out, extra):
    args = (grad_y, grad_out, x, cond, *mlp.args()) + (() if extra is None else (extra,))
    return named_grads(mode, fused(f"mlp_{mode}_backward", *args), len(mlp.weights))


def output_grads(mode, mlp, x, cond, extra, seed=11):
    """Random gradients w.r.t. the forward's two outputs, shaped like them."""
    gen = torch.Generator().manual_seed(seed)
    lead, d_in, d_out = x.shape[:-1], x.shape[-1], mlp.weights[-1].shape[0]
    out_shape = {"jacobian": (*lead, d_out, d_in), "divergence": lead, "hutchinson": lead,
                 "jvp": (*lead, 0 if extra is None else extra.shape[-2], d_out)}[mode]
    grad_y = torch.randn(*lead, d_out, generator=gen, dtype=torch.float64).to(DEVICE, x.dtype)
    grad_out = torch.randn(*out_shape, generator=gen, dtype=torch.float64).to(DEVICE, x.dtype)
    return grad_y, grad_out


def check_backward(mode, mlp, x, cond, extra=None, grad_y=None, grad_out=None):
    """The fused backward against the float64 oracle: float64 to 1e-10 of each gradient's largest entry;
    float32 to 1e-5, or to 8x the worst error of PyTorch's own float32 autograd on the same call where
    that is larger (deep sine nets amplify float32 rounding)."""
    dtype = x.dtype
    if grad_y is None:
        grad_y, grad_out = output_grads(mode, mlp, x, cond, extra)
    got = fused_backward(mode, mlp, x, cond, grad_y, grad_out, extra)
    expected = oracle_grads(mode, mlp, x, cond, grad_y, grad_out, extra)
    assert got.keys() == expected.keys()
    errors = {}
    for name, e in expected.items():
        a = got[name]
        assert a.shape == e.shape, f"{mode} {name}: shape {tuple(a.shape)} != {tuple(e.shape)}"
        assert a.dtype == dtype and a.device == x.device, f"{mode} {name}: {a.dtype} on {a.device}"
        assert a.is_contiguous(), f"{mode} {name} is not contiguous"
        errors[name] = max_rel_err(a, e)
    worst = max(errors, key=errors.get)
    if dtype == torch.float64:
        assert errors[worst] <= FLOAT64_TOL, f"{mode} {worst}: relative error {errors[worst]:.3e} > {FLOAT64_TOL}"
    elif errors[worst] > FLOAT32_TOL:
        baseline = oracle_grads(mode, mlp, x, cond, grad_y, grad_out, extra, dtype=torch.float32)
        torch_err = max(max_rel_err(baseline[name], e) for name, e in expected.items())
        assert errors[worst] <= 8 * torch_err, (f"{mode} {worst}: relative error {errors[worst]:.3e} > {FLOAT32_TOL} "
                                                f"(PyTorch float32, worst gradient: {torch_err:.3e})")
    return got


# --- correctness of every combination ------------------------------------------

COND_CASES = {"no_cond": None, "broadcast": (2, 1), "full": (2, 24)}  # x is (2, 24, 3)
SKIP_CASES = {"no_skip": (), "skip2": (2,)}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cond_case", list(COND_CASES))
@pytest.mark.parametrize("skip_case", list(SKIP_CASES))
@pytest.mark.parametrize("act", ACTIVATION_CASES, ids=[a[0] for a in ACTIVATION_CASES])
def test_every_activation_skip_and_cond(act, skip_case, cond_case, dtype):
    """All four backward ops, for every activation (hidden and output layer), skip and cond layout."""
    _, code, p0, p1 = act
    cond_lead = COND_CASES[cond_case]
    c = 0 if cond_lead is None else 2
    mlp = make_mlp(3, 3, [32, 32, 32], c=c, act=(code, p0, p1), last_act=(code, p0, p1),
                   skips=SKIP_CASES[skip_case], dtype=dtype)
    x = points(2, 24, d_in=3, dtype=dtype)
    cond = no_cond(x) if cond_lead is None else points(*cond_lead, d_in=c, dtype=dtype, seed=7)
    for mode in MODES:
        check_backward(mode, mlp, x, cond, extra_input(mode, x, k=2 if mode == "jvp" else 3))


@pytest.mark.parametrize("act", ACTIVATION_CASES, ids=[a[0] for a in ACTIVATION_CASES])
def test_kinks(act):
    """Zero inputs and biases put z exactly at 0, where ReLU, LeakyReLU and ELU have kinks."""
    _, code, p0, p1 = act
    mlp = make_mlp(3, 3, [16, 16], act=(code, p0, p1), last_act=(code, p0, p1))
    for b in mlp.biases:
        b.zero_()
    x = points(40, d_in=3, dtype=torch.float64)
    x[::2] = 0
    check_backward("jacobian", mlp, x, no_cond(x))


def test_softplus_at_threshold():
    """beta * z == threshold exactly: Softplus' is still the sigmoid there, but Softplus'' is already 0,
    as in PyTorch's autograd."""
    mlp = make_mlp(1, 1, [2], act=(3, 2.0, 1.0))
    mlp.weights[0].copy_(torch.tensor([[1.0], [0.5]]))
    mlp.biases[0].zero_()
    x = torch.tensor([[0.5], [0.25], [-0.5], [2.0]], device=DEVICE, dtype=torch.float64)  # 0.5: beta * z = 1
    for mode in MODES:
        check_backward(mode, mlp, x, no_cond(x), extra_input(mode, x, k=2))


# --- coverage of the kernels -----------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", TEMPLATE_WIDTHS + [8, 48, 100, 200])
def test_every_width(width, dtype):
    """The template widths, and widths in between (run by the next larger template)."""
    mlp = make_mlp(3, 3, [width] * 3, c=1, skips=(2,), dtype=dtype)
    x = points(70, d_in=3, dtype=dtype)
    cond = points(70, d_in=1, dtype=dtype, seed=3)
    for mode in MODES:
        check_backward(mode, mlp, x, cond, extra_input(mode, x, k=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d_in,d_out", [(1, 1), (1, 16), (16, 1), (16, 16), (2, 5), (8, 3)])
def test_in_out_dims(d_in, d_out, dtype):
    mlp = make_mlp(d_in, d_out, [64, 64], act=(7, 0.0, 0.0), dtype=dtype)
    x = points(40, d_in=d_in, dtype=dtype)
    modes = MODES if d_in == d_out else ["jacobian", "jvp"]
    for mode in modes:
        check_backward(mode, mlp, x, no_cond(x), extra_input(mode, x, k=3))


@pytest.mark.parametrize("num_points", [1, 7, 8, 9, 100, 5001])
def test_tile_boundaries_and_many_tiles(num_points):
    """float64 at width 128 holds 8 points per tile with 3 tangents. 5001 points are 626 tiles, several per
    block on any GPU (the grid has at most the resident blocks), so partial sums add up over tiles."""
    mlp = make_mlp(3, 3, [128, 128])
    x = points(num_points, d_in=3, dtype=torch.float64)
    check_backward("jacobian", mlp, x, no_cond(x))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [0, 1, 16, 17, 40])
def test_jvp_tangent_passes(k, dtype):
    """More than 16 tangents run as several passes; each adds its share of every gradient."""
    mlp = make_mlp(3, 5, [64] * 3, c=1, dtype=dtype)
    x = points(30, d_in=3, dtype=dtype)
    cond = points(30, d_in=1, dtype=dtype, seed=8)
    check_backward("jvp", mlp, x, cond, extra_input("jvp", x, k))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("samples", [1, 16, 17, 33])
def test_hutchinson_sample_passes(samples, dtype):
    mlp = make_mlp(3, 3, [128] * 2, dtype=dtype)
    x = points(2, 15, d_in=3, dtype=dtype)
    check_backward("hutchinson", mlp, x, no_cond(x), extra_input("hutchinson", x, samples))


COND_LAYOUTS = {  # x is (4, 50, 3); cond shapes
    "shared": (1, 1),
    "per_batch": (4, 1),
    "per_row": (1, 50),
    "full": (4, 50),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("c", [1, 5, 20])
@pytest.mark.parametrize("layout", list(COND_LAYOUTS))
def test_cond_layouts(layout, c, dtype):
    """grad_cond sums over the points that share a cond row; 20 cond columns need two input groups."""
    mlp = make_mlp(3, 3, [32, 32, 32], c=c, skips=(1, 3), dtype=dtype)
    x = points(4, 50, d_in=3, dtype=dtype)
    cond = points(*COND_LAYOUTS[layout], d_in=c, dtype=dtype, seed=7)
    for mode in ("jacobian", "jvp"):
        check_backward(mode, mlp, x, cond, extra_input(mode, x, k=2))


def test_cond_broadcast_in_alternating_dims():
    mlp = make_mlp(2, 2, [16, 16], c=3, skips=(1,))
    x = points(3, 4, 5, 6, d_in=2, dtype=torch.float64)
    cond = points(3, 1, 5, 1, d_in=3, dtype=torch.float64, seed=3)
    check_backward("divergence", mlp, x, cond)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_shared_cond_over_many_points(dtype):
    """One cond row read by 3000 points: its gradient is summed in chunks, then over the chunks."""
    mlp = make_mlp(3, 3, [32, 32], c=4, dtype=dtype)
    x = points(3000, d_in=3, dtype=dtype)
    cond = points(1, d_in=4, dtype=dtype, seed=5)
    check_backward("divergence", mlp, x, cond)


@pytest.mark.parametrize("hidden", [[], [8], [4, 4]], ids=["single_layer", "d_out_above_width", "narrow"])
def test_small_networks(hidden):
    mlp = make_mlp(3, 16 if hidden == [8] else 3, hidden, c=1)
    x = points(33, d_in=3, dtype=torch.float64)
    cond = points(33, d_in=1, dtype=torch.float64, seed=2)
    check_backward("jacobian", mlp, x, cond)
    check_backward("jvp", mlp, x, cond, extra_input("jvp", x, 2))


def test_deep_network():
    mlp = make_mlp(3, 3, [32] * 12, c=2, skips=(4, 8), act=(7, 0.0, 0.0))
    x = points(50, d_in=3, dtype=torch.float64)
    cond = points(50, d_in=2, dtype=torch.float64, seed=2)
    check_backward("jacobian", mlp, x, cond)


# --- the glue: shapes, layouts, errors -------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)], ids=str)
def test_zero_points(mode, lead):
    """No points: zero gradients of the right shapes (cond may still have a row)."""
    mlp = make_mlp(3, 3, [32], c=1)
    x = torch.zeros(*lead, 3, device=DEVICE, dtype=torch.float64)
    cond = torch.ones(*[1] * len(lead), 1, device=DEVICE, dtype=torch.float64)
    extra = None if mode in ("jacobian", "divergence") else x.new_ones(*lead, 2, 3)
    grad_y, grad_out = output_grads(mode, mlp, x, cond, extra)
    got = fused_backward(mode, mlp, x, cond, grad_y, grad_out, extra)
    expected = {"grad_x": x, "grad_cond": cond, "grad_tangents": extra}
    for name, g in got.items():
        like = expected.get(name)
        if like is None:
            layer = int(name[name.index("[") + 1:-1])
            like = (mlp.weights if name.startswith("grad_weights") else mlp.biases)[layer]
        assert g.shape == like.shape, name
        assert not g.any(), name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(dtype):
    """Strided x and tangents, a stride-0 cond, column-major weights, and output gradients
    as autograd produces them: expanded (stride 0) from a .sum(), or transposed."""
    mlp = make_mlp(3, 3, [32, 32], c=2, skips=(1,), dtype=dtype)
    mlp.weights = [w.t().contiguous().t() for w in mlp.weights]
    x = points(80, 3, d_in=5, dtype=dtype).transpose(0, 1)[..., 1:4]  # (3, 80, 3), strided
    cond = points(1, 80, d_in=2, dtype=dtype, seed=3).expand(3, 80, 2)
    tangents = points(3, 80, 2, d_in=4, dtype=dtype, seed=4)[..., 1:]
    assert not x.is_contiguous() and not tangents.is_contiguous()
    grad_y = points(3, 3, 80, d_in=1, dtype=dtype, seed=5)[..., 0].transpose(1, 2)  # (3, 80, 3) transposed
    grad_div = torch.ones((), device=DEVICE, dtype=dtype).expand(3, 80)
    check_backward("divergence", mlp, x, cond, grad_y=grad_y, grad_out=grad_div)
    grad_jvp = points(3, 80, 3, 2, d_in=1, dtype=dtype, seed=6)[..., 0].transpose(-1, -2)
    check_backward("jvp", mlp, x, cond, tangents, grad_y=grad_y, grad_out=grad_jvp)


def test_deterministic():
    """No atomics: two calls give bitwise equal gradients."""
    mlp = make_mlp(3, 3, [128] * 3, c=2, dtype=torch.float32)
    x = points(4, 500, d_in=3, dtype=torch.float32)
    cond = points(4, 1, d_in=2, dtype=torch.float32, seed=2)
    grad_y, grad_out = output_grads("jacobian", mlp, x, cond, None)
    first = fused_backward("jacobian", mlp, x, cond, grad_y, grad_out, None)
    second = fused_backward("jacobian", mlp, x, cond, grad_y, grad_out, None)
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_errors_name_the_argument():
    """ValueError/TypeError that name the argument, as the Python checks do."""
    mlp = make_mlp(3, 2, [32], dtype=torch.float32)
    x = points(10, d_in=3, dtype=torch.float32)
    cond = no_cond(x)
    y, jac, _ = torch.ops.torchjac.mlp_jacobian(x, cond, *mlp.args())
    op = torch.ops.torchjac.mlp_jacobian_backward
    with pytest.raises(ValueError, match=r"mlp_jacobian_backward: grad_y: expected shape \(10, 2\) like y, got"):
        op(y.new_zeros(10, 3), jac, x, cond, *mlp.args())
    with pytest.raises(ValueError, match=r"grad_jac: expected shape \(10, 2, 3\)"):
        op(y, jac.transpose(1, 2), x, cond, *mlp.args())
    with pytest.raises(ValueError, match=r"grad_y: expected dtype torch.float32 like x, got torch.float64"):
        op(y.double(), jac, x, cond, *mlp.args())
    with pytest.raises(ValueError, match=r"weights\[1\]: expected dtype torch.float32 like x"):
        weights = list(mlp.weights)
        weights[1] = weights[1].double()
        op(y, jac, x, cond, weights, *mlp.args()[1:])
    with pytest.raises(ValueError, match="mlp_divergence_backward: divergence needs d_out == d_in"):
        torch.ops.torchjac.mlp_divergence_backward(y, y[:, 0], x, cond, *mlp.args())
    with pytest.raises(ValueError, match=r"tangents: expected shape \(10, 'k', 3\)"):
        torch.ops.torchjac.mlp_jvp_backward(y, y.new_zeros(10, 2, 2), x, cond, *mlp.args(), x.new_zeros(10, 2, 4))
    with pytest.raises(ValueError, match=r"grad_jvp: expected shape \(10, 2, 2\)"):
        torch.ops.torchjac.mlp_jvp_backward(y, y.new_zeros(10, 3, 2), x, cond, *mlp.args(), x.new_zeros(10, 2, 3))
    square = make_mlp(3, 3, [32], dtype=torch.float32)
    with pytest.raises(ValueError, match=r"noise: expected at least one sample"):
        torch.ops.torchjac.mlp_hutchinson_backward(x, x[:, 0], x, cond, *square.args(), x.new_zeros(10, 0, 3))
    with pytest.raises(TypeError, match="support float32 and float64, got x of dtype torch.float16"):
        half = Mlp([w.half() for w in mlp.weights], [b.half() for b in mlp.biases], *mlp.args()[2:])
        op(y.half(), jac.half(), x.half(), cond.half(), *half.args())



@needs_real_gpu
def test_device_errors_name_the_argument():
    """A tensor on another device than x (the emulation has only one)."""
    mlp = make_mlp(3, 2, [32], dtype=torch.float32)
    x = points(10, d_in=3, dtype=torch.float32)
    cond = no_cond(x)
    y, jac, _ = torch.ops.torchjac.mlp_jacobian(x, cond, *mlp.args())
    op = torch.ops.torchjac.mlp_jacobian_backward
    with pytest.raises(ValueError, match=r"biases\[0\]: expected device cuda:0 like x, got cpu"):
        biases = list(mlp.biases)
        biases[0] = biases[0].cpu()
        op(y, jac, x, cond, mlp.weights, biases, *mlp.args()[2:])


# --- PyTorch integration ------------------------------------------------------------

def opcheck_samples(mode):
    mlp = make_mlp(3, 3, [32, 32], c=1, skips=(1,))
    for requires_grad in (False, True):
        x = points(2, 20, d_in=3, dtype=torch.float64)
        cond = points(2, 1, d_in=1, dtype=torch.float64, seed=2)
        extra = extra_input(mode, x, k=2)
        grad_y, grad_out = output_grads(mode, mlp, x, cond, extra)
        leaves = [grad_y, grad_out, x, cond, *mlp.weights, *mlp.biases] + ([extra] if mode == "jvp" else [])
        leaves = [t.clone().requires_grad_(requires_grad) for t in leaves]
        grad_y, grad_out, x, cond = leaves[:4]
        n = len(mlp.weights)
        weights, biases = leaves[4:4 + n], leaves[4 + n:4 + 2 * n]
        if mode == "jvp":
            extra = leaves[-1]
        yield (grad_y, grad_out, x, cond, weights, biases, mlp.activations, mlp.params, mlp.skips) + \
            (() if extra is None else (extra,))


@pytest.mark.parametrize("mode", MODES)
def test_opcheck(mode):
    op = getattr(torch.ops.torchjac, f"mlp_{mode}_backward").default
    for args in opcheck_samples(mode):
        torch.library.opcheck(op, args)


def jacobian_loss(f, x, cond):
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    return ((jac - torch.eye(3, device=x.device, dtype=x.dtype)) ** 2).sum() + 0.1 * (y ** 2).mean()


def divergence_loss(f, x, cond):
    y, div = torchjac.divergence(f, x, cond=cond, return_output=True)
    return 0.5 * (y ** 2).sum(-1).mean() - div.mean()


TRAINING_LOSSES = {"jacobian": jacobian_loss, "divergence": divergence_loss}


@pytest.mark.parametrize("name", sorted(TRAINING_LOSSES))
def test_compiled_training_step_equals_eager(name):
    """torch.compile(fullgraph=True) of a loss on the public API, then backward and an SGD step."""
    loss_fn = TRAINING_LOSSES[name]

    def step(fn, f, x, cond):
        f.zero_grad()
        x.grad = cond.grad = None
        with fallback_messages() as fell_back:
            loss = fn(f, x, cond)
            loss.backward()
        assert not fell_back, fell_back[0]
        grads = [loss.detach(), x.grad.clone(), cond.grad.clone()] + [p.grad.clone() for p in f.parameters()]
        with torch.no_grad():
            for p in f.parameters():
                p -= 1e-3 * p.grad
        return grads, [p.detach().clone() for p in f.parameters()]

    def model():
        torch.manual_seed(0)
        return torchjac.PointMLP(3, [64] * 3, 3, activation="softplus", cond_features=2, skip_layers=(2,)).to(DEVICE)

    x = points(4, 200, d_in=3, dtype=torch.float32).requires_grad_()
    cond = points(4, 1, d_in=2, dtype=torch.float32, seed=3).requires_grad_()
    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True)
    f_eager, f_compiled = model(), model()
    for _ in range(2):  # the second step runs on updated parameters
        expected, params_eager = step(loss_fn, f_eager, x, cond)
        got, params_compiled = step(compiled, f_compiled, x, cond)
        for a, e in zip(got + params_compiled, expected + params_eager):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


@needs_real_gpu
def test_compile_reduce_overhead():
    """CUDA graphs replay the backward on the capture stream: catches launches, memsets or workspace
    allocations outside the current stream."""
    mlp = make_mlp(3, 3, [64, 64], c=1, dtype=torch.float32)

    def fn(grad_y, grad_jac, x, cond):
        return torch.ops.torchjac.mlp_jacobian_backward(grad_y, grad_jac, x, cond, *mlp.args())

    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, recording, then replays
        x = points(500, d_in=3, dtype=torch.float32, seed=step)
        cond = points(1, d_in=1, dtype=torch.float32, seed=10 + step)
        grad_y, grad_jac = output_grads("jacobian", mlp, x, cond, None, seed=20 + step)
        expected = torch.utils._pytree.tree_leaves(fn(grad_y, grad_jac, x, cond))
        got = [t.clone() for t in torch.utils._pytree.tree_leaves(compiled(grad_y, grad_jac, x, cond))]
        assert len(got) == len(expected)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


class _Wrapped(torch.nn.Module):
    """torchjac on a PointMLP as a module, so functional_call can hand it parameters as inputs."""

    def __init__(self, fn, f):
        super().__init__()
        self.fn, self.f = fn, f

    def forward(self, x, cond):
        return self.fn(self.f, x, cond)


PUBLIC_FUNCTIONS = {
    "jacobian": lambda f, x, cond: torchjac.jacobian(f, x, cond=cond),
    "divergence": lambda f, x, cond: torchjac.divergence(f, x, cond=cond),
    "jvp": lambda f, x, cond: torchjac.jvp(f, x, torch.ones_like(x), cond=cond),
}


@pytest.mark.parametrize("name", sorted(PUBLIC_FUNCTIONS))
def test_gradcheck_and_gradgradcheck_public_api(name):
    """First derivatives run the fused backward kernel; second derivatives differentiate it (autograd
    through the reference reverse pass), checked against finite differences of the fused kernels."""
    torch.manual_seed(0)
    f = torchjac.PointMLP(3, [8, 8], 3, activation="softplus", cond_features=2, skip_layers=(2,)).to(DEVICE).double()
    wrapped = _Wrapped(PUBLIC_FUNCTIONS[name], f)
    names = [n for n, _ in wrapped.named_parameters()]
    x = points(2, 3, d_in=3, dtype=torch.float64).requires_grad_()
    cond = points(2, 1, d_in=2, dtype=torch.float64, seed=2).requires_grad_()
    params = [p.detach().clone().requires_grad_() for p in wrapped.parameters()]

    def fn(x, cond, *params):
        return torch.func.functional_call(wrapped, dict(zip(names, params)), (x, cond))

    with fallback_messages() as fell_back:
        assert gradcheck(fn, (x, cond, *params))
        assert gradgradcheck(fn, (x, cond, *params))
    assert not fell_back, fell_back[0]


# --- fallback --------------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import torch, torchjac
    w = [torch.randn(320, 3, device="cuda"), torch.randn(3, 320, device="cuda")]
    b = [torch.randn(320, device="cuda"), torch.randn(3, device="cuda")]
    x = torch.randn(50, 3, device="cuda")
    cond = x.new_zeros(50, 0)
    args = (x, cond, w, b, [3, 0], [1.0, 20.0, 0.0, 0.0], [])
    for _ in range(3):
        grads = torch.ops.torchjac.mlp_jacobian_backward(x.new_ones(50, 3), x.new_ones(50, 3, 3), *args)
    torch.cuda.synchronize()
    print("SHAPES", tuple(grads[0].shape), tuple(grads[2][0].shape))
""")


@needs_real_gpu
def test_fallback_warns_once():
    """Width 320 is past the largest template: the reference path runs, with one warning per process."""
    result = subprocess.run([sys.executable, "-W", "always", "-c", FALLBACK_SCRIPT], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count("fused CUDA backward kernels do not cover") == 1, result.stderr
    assert "hidden width" in result.stderr, result.stderr  # the warning says why
    assert "SHAPES (50, 3) (320, 3)" in result.stdout


@pytest.mark.parametrize("mode", MODES)
def test_fallback_is_correct(mode):
    """Widths past the templates run the reference path and still match the oracle."""
    mlp = make_mlp(3, 3, [320, 320], c=1)
    x = points(20, d_in=3, dtype=torch.float64)
    cond = points(1, d_in=1, dtype=torch.float64, seed=2)
    extra = extra_input(mode, x, k=2)
    grad_y, grad_out = output_grads(mode, mlp, x, cond, extra)
    args = (grad_y, grad_out, x, cond, *mlp.args()) + (() if extra is None else (extra,))
    got = named_grads(mode, getattr(torch.ops.torchjac, f"mlp_{mode}_backward")(*args), 3)
    expected = oracle_grads(mode, mlp, x, cond, grad_y, grad_out, extra)
    for name, e in expected.items():
        assert max_rel_err(got[name], e) <= FLOAT64_TOL, name


# --- compute-sanitizer -------------------------------------------------------------

SANITIZER_SCRIPT = textwrap.dedent("""
    import torch, torchjac
    torch.manual_seed(0)
    def mlp(d_in, d_out, hidden, c, dtype, skips=()):
        ws, bs, prev = [], [], 0
        for layer, out in enumerate(hidden + [d_out]):
            fan_in = (prev if layer else 0) + (d_in + c if layer == 0 or layer in skips else 0)
            ws.append(torch.randn(out, fan_in, device="cuda", dtype=dtype) / fan_in ** 0.5)
            bs.append(torch.randn(out, device="cuda", dtype=dtype))
            prev = out
        n = len(ws)
        return ws, bs, [3] * (n - 1) + [0], [1.0, 20.0] * n, list(skips)
    for dtype in (torch.float32, torch.float64):
        for width in (16, 64, 128, 256):
            args = mlp(3, 3, [width] * 2, 2, dtype, skips=(1,))
            x = torch.randn(37, 3, device="cuda", dtype=dtype)
            full = torch.randn(37, 2, device="cuda", dtype=dtype)
            shared = torch.randn(1, 2, device="cuda", dtype=dtype)
            t = torch.randn(37, 19, 3, device="cuda", dtype=dtype)
            gy = torch.randn(37, 3, device="cuda", dtype=dtype)
            for cond in (full, shared):
                ops = torch.ops.torchjac
                ops.mlp_jacobian_backward(gy, torch.randn(37, 3, 3, device="cuda", dtype=dtype), x, cond, *args)
                ops.mlp_divergence_backward(gy, torch.randn(37, device="cuda", dtype=dtype), x, cond, *args)
                ops.mlp_jvp_backward(gy, torch.randn(37, 19, 3, device="cuda", dtype=dtype), x, cond, *args, t)
                ops.mlp_hutchinson_backward(gy, torch.randn(37, device="cuda", dtype=dtype), x, cond, *args, t)
    torch.cuda.synchronize()
    print("SANITIZER_SCRIPT_DONE")
""")


@pytest.mark.skipif(shutil.which("compute-sanitizer") is None, reason="compute-sanitizer is not on PATH")
@pytest.mark.parametrize("tool", ["memcheck", "racecheck", "synccheck", "initcheck"])
def test_compute_sanitizer(tool, tmp_path):
    script = tmp_path / "sanitize.py"
    script.write_text(SANITIZER_SCRIPT)
    env = dict(os.environ, PYTORCH_NO_CUDA_MEMORY_CACHING="1")  # exact allocations for memcheck
    result = subprocess.run(
        ["compute-sanitizer", f"--tool={tool}", "--error-exitcode=1", sys.executable, str(script)],
        capture_output=True, text=True, timeout=1800, env=env)
    output = result.stdout + result.stderr
    assert result.returncode == 0 and "SANITIZER_SCRIPT_DONE" in output, output[-5000:]
    assert "ERROR SUMMARY: 0 errors" in output, output[-5000:]
