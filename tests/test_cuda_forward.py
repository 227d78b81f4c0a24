"""The fused CUDA forward kernels (csrc/cuda/mlp_forward.cu) against a torch.func oracle.

The oracle is built here from the same weights: a float64 MLP written with
torch.nn.functional, differentiated with vmap(jacrev). It shares no code with
torchjac. The ops are called directly through torch.ops.torchjac with explicit
weight lists. Every call made through `fused` also asserts that the fused
kernel ran, not the reference fallback. It runs on a CUDA device or, with
TORCHJAC_EMULATE_CUDA=1, in the host emulation of the kernels (tests/cuda_backend.py).
"""
import contextlib
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch.func import hessian, jacrev, vmap

import torchjac  # noqa: F401  (loads torchjac._C: the op schemas and the CUDA kernels)
from cuda_backend import DEVICE, needs_real_gpu, requires_kernels

pytestmark = requires_kernels
FALLBACK_MESSAGE = "reference path"  # in the glue's fallback warning
TEMPLATE_WIDTHS = [16, 32, 64, 128, 256]
FLOAT64_TOL = 1e-10
FLOAT32_TOL = 1e-5

# Activation code -> PyTorch function of (z, p0, p1); codes of csrc/cuda/activations.cuh.
ORACLE_ACTIVATIONS = {
    0: lambda z, a, b: z,
    1: lambda z, a, b: F.relu(z),
    2: lambda z, a, b: F.leaky_relu(z, a),
    3: lambda z, a, b: F.softplus(z, a, b),
    4: lambda z, a, b: F.silu(z),
    5: lambda z, a, b: F.gelu(z),
    6: lambda z, a, b: F.gelu(z, approximate="tanh"),
    7: lambda z, a, b: torch.tanh(z),
    8: lambda z, a, b: torch.sigmoid(z),
    9: lambda z, a, b: F.elu(z, a),
    10: lambda z, a, b: torch.sin(a * z),
}

# (id, code, p0, p1)
ACTIVATION_CASES = [
    ("identity", 0, 0.0, 0.0),
    ("relu", 1, 0.0, 0.0),
    ("leaky_relu", 2, 0.1, 0.0),
    ("softplus", 3, 1.0, 20.0),
    ("softplus_beta2_threshold1", 3, 2.0, 1.0),  # hits the linear branch
    ("silu", 4, 0.0, 0.0),
    ("gelu", 5, 0.0, 0.0),
    ("gelu_tanh", 6, 0.0, 0.0),
    ("tanh", 7, 0.0, 0.0),
    ("sigmoid", 8, 0.0, 0.0),
    ("elu", 9, 1.0, 0.0),
    ("elu_alpha_0.5", 9, 0.5, 0.0),
    ("sine", 10, 3.0, 0.0),
]
SOFTPLUS = (3, 1.0, 20.0)
IDENTITY = (0, 0.0, 0.0)


@dataclass
class Mlp:
    weights: list
    biases: list
    activations: list
    params: list
    skips: list = field(default_factory=list)

    def args(self):
        return self.weights, self.biases, self.activations, self.params, self.skips

    def to(self, dtype):
        return Mlp([w.to(dtype) for w in self.weights], [b.to(dtype) for b in self.biases],
                   self.activations, self.params, self.skips)


def make_mlp(d_in, d_out, hidden, c=0, act=SOFTPLUS, last_act=IDENTITY, skips=(), dtype=torch.float64,
             seed=0, zero_bias=False):
    """Random weights, drawn in float64 on the CPU and then cast, so every dtype sees the same MLP."""
    gen = torch.Generator().manual_seed(seed)
    widths = list(hidden) + [d_out]
    weights, biases, activations, params = [], [], [], []
    prev = 0
    for layer, out in enumerate(widths):
        fan_in = (prev if layer else 0) + (d_in + c if layer == 0 or layer in skips else 0)
        w = torch.randn(out, fan_in, generator=gen, dtype=torch.float64) * (1.5 / math.sqrt(fan_in))
        b = torch.zeros(out, dtype=torch.float64) if zero_bias else 0.2 * torch.randn(out, generator=gen, dtype=torch.float64)
        code, p0, p1 = last_act if layer == len(widths) - 1 else act
        weights.append(w.to(DEVICE, dtype))
        biases.append(b.to(DEVICE, dtype))
        activations.append(code)
        params += [p0, p1]
        prev = out
    return Mlp(weights, biases, activations, params, list(skips))


def oracle(mlp, x, cond, dtype=torch.float64):
    """(y, J) of the MLP at every point, in `dtype`, with vmap(jacrev)."""
    f, xs, cs, lead = _point_function(mlp, x, cond, dtype)
    y = vmap(f)(xs, cs)
    jac = vmap(jacrev(f))(xs, cs)
    d_out = y.shape[-1]
    return y.reshape(*lead, d_out), jac.reshape(*lead, d_out, x.shape[-1])


def oracle_hessian(mlp, x, cond):
    """(y, H) of the MLP at every point, in float64, with vmap(torch.func.hessian)."""
    f, xs, cs, lead = _point_function(mlp, x, cond, torch.float64)
    y = vmap(f)(xs, cs)
    hess = vmap(hessian(f))(xs, cs)
    return y.reshape(*lead, y.shape[-1]), hess.reshape(*lead, *hess.shape[-3:])


def _point_function(mlp, x, cond, dtype):
    """(f(x_point, cond_point), the points, their cond rows, x's leading shape): the MLP in `dtype` with
    torch.nn.functional."""
    d_in, c = x.shape[-1], cond.shape[-1]
    lead = x.shape[:-1]
    xs = x.detach().reshape(-1, d_in).to(dtype)
    cs = cond.detach().expand(*lead, c).reshape(xs.shape[0], c).to(dtype)
    ws = [w.detach().to(dtype) for w in mlp.weights]
    bs = [b.detach().to(dtype) for b in mlp.biases]

    def f(xp, cp):
        h = None
        for layer, (w, b) in enumerate(zip(ws, bs)):
            if layer == 0:
                inp = torch.cat([xp, cp])
            elif layer in mlp.skips:
                inp = torch.cat([h, xp, cp])
            else:
                inp = h
            code = mlp.activations[layer]
            h = ORACLE_ACTIVATIONS[code](w @ inp + b, mlp.params[2 * layer], mlp.params[2 * layer + 1])
        return h

    return f, xs, cs, lead


@contextlib.contextmanager
def fallback_messages():
    """Collects fallback warnings, from Python's warnings and from file descriptor 2.

    TORCH_WARN in an op called through torch.ops reaches C++ stderr, not Python's
    warnings module, in the PyTorch versions we test (pytorch/pytorch#193451).
    """
    found = []
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        os.dup2(tmp.fileno(), 2)
        try:
            yield found
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            lines = tmp.read().decode(errors="replace").splitlines() + [str(w.message) for w in caught]
            found += [line for line in lines if FALLBACK_MESSAGE in line]


def fused(op_name, *args):
    """(y, out) of torch.ops.torchjac.<op_name>, asked to keep states; fails if it fell back to the reference
    path, or if it kept states (the fused backward recomputes on chip)."""
    prev = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # TORCH_WARN_ONCE warns on every call
    try:
        with fallback_messages() as fell_back:
            y, out, states = getattr(torch.ops.torchjac, op_name)(*args, True)
    finally:
        torch.set_warn_always(prev)
    assert not fell_back, f"{op_name} fell back to the reference path: {fell_back[0]}"
    assert states.numel() == 0, f"{op_name} kept {states.numel()} states"
    return y, out


def max_rel_err(actual, expected):
    """max |a - e| / max |e| (0 for empty tensors)."""
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-300)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def assert_close(actual, expected, dtype, what, float32_baseline=None):
    """float64: 1e-10 relative to the largest entry. float32: 1e-5, or, where
    PyTorch's own float32 math is worse (e.g. deep sine nets), 8x PyTorch's error."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    err = max_rel_err(actual, expected)
    if dtype == torch.float64:
        assert err <= FLOAT64_TOL, f"{what}: relative error {err:.3e} > {FLOAT64_TOL}"
        return
    if err <= FLOAT32_TOL:
        return
    baseline = float32_baseline() if float32_baseline is not None else 0.0
    assert err <= 8 * baseline, f"{what}: relative error {err:.3e} > {FLOAT32_TOL} (PyTorch float32: {baseline:.3e})"


def check_jacobian(mlp, x, cond, dtype):
    y, jac = fused("mlp_jacobian", x, cond, *mlp.args())
    y64, jac64 = oracle(mlp, x, cond)

    def baseline(i):
        return lambda: max_rel_err(oracle(mlp, x, cond, torch.float32)[i], (y64, jac64)[i])

    assert_close(y, y64, dtype, "y", baseline(0))
    assert_close(jac, jac64, dtype, "jacobian", baseline(1))


def points(*shape, d_in, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, d_in, generator=gen, dtype=torch.float64).to(DEVICE, dtype)


def no_cond(x):
    return x.new_zeros(*x.shape[:-1], 0)


DTYPES = [torch.float32, torch.float64]
DTYPE_IDS = ["f32", "f64"]


# --- coverage of the kernels ------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTIVATION_CASES, ids=[a[0] for a in ACTIVATION_CASES])
def test_jacobian_every_activation(act, dtype):
    _, code, p0, p1 = act
    mlp = make_mlp(3, 2, [32, 32], act=(code, p0, p1), last_act=(code, p0, p1), dtype=dtype)
    x = points(300, d_in=3, dtype=dtype)
    check_jacobian(mlp, x, no_cond(x), dtype)


@pytest.mark.parametrize("act", ACTIVATION_CASES, ids=[a[0] for a in ACTIVATION_CASES])
def test_derivative_at_kinks(act):
    """Zero inputs and biases put z exactly at 0, where ReLU, LeakyReLU and ELU have kinks."""
    _, code, p0, p1 = act
    mlp = make_mlp(3, 3, [16, 16], act=(code, p0, p1), last_act=(code, p0, p1), zero_bias=True)
    x = points(40, d_in=3, dtype=torch.float64)
    x[::2] = 0
    check_jacobian(mlp, x, no_cond(x), torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", TEMPLATE_WIDTHS + [8, 48, 100, 200])
def test_jacobian_every_width(width, dtype):
    """The template widths, and widths in between (run by the next larger template)."""
    mlp = make_mlp(3, 3, [width] * 4, dtype=dtype)
    x = points(257, d_in=3, dtype=dtype)
    check_jacobian(mlp, x, no_cond(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d_out", [1, 2, 3, 8, 16])
@pytest.mark.parametrize("d_in", [1, 2, 3, 8, 16])
def test_jacobian_in_out_dims(d_in, d_out, dtype):
    mlp = make_mlp(d_in, d_out, [64, 64], act=(7, 0.0, 0.0), dtype=dtype)
    x = points(70, d_in=d_in, dtype=dtype)
    check_jacobian(mlp, x, no_cond(x), dtype)


@pytest.mark.parametrize("num_points", [1, 2, 15, 16, 17, 1000, 4099])
def test_tile_boundaries(num_points):
    """Width 128 with d_in = 3 holds 16 points per tile."""
    mlp = make_mlp(3, 3, [128, 128])
    x = points(num_points, d_in=3, dtype=torch.float64)
    check_jacobian(mlp, x, no_cond(x), torch.float64)


def _gpu_memory_gb():
    try:
        return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:
        return 0.0


@pytest.mark.skipif(_gpu_memory_gb() < 40, reason="needs a CUDA device with 40 GB")
def test_outputs_past_int32_indexing():
    """A Jacobian with more than 2**31 entries: the last points must still land in the right place."""
    n = 2**31 // (16 * 16) + 1000
    mlp = make_mlp(16, 16, [16], dtype=torch.float32)
    x = points(n, d_in=16, dtype=torch.float32)
    y, jac = fused("mlp_jacobian", x, no_cond(x), *mlp.args())
    for rows in (slice(0, 100), slice(n - 100, n)):
        y64, jac64 = oracle(mlp, x[rows], no_cond(x[rows]))
        assert_close(jac[rows], jac64, torch.float32, f"jacobian rows {rows}")
        assert_close(y[rows], y64, torch.float32, f"y rows {rows}")


COND_LAYOUTS = {  # x is (4, 50, 3); cond shapes
    "shared": (1, 1),
    "per_batch": (4, 1),
    "per_row": (1, 50),
    "full": (4, 50),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("skips", [(), (2,)], ids=["no_skip", "skip2"])
@pytest.mark.parametrize("c", [1, 5])
@pytest.mark.parametrize("layout", list(COND_LAYOUTS))
def test_cond(layout, c, skips, dtype):
    """Broadcast cond (projected once per cond row) and per-point cond (read in the tile)."""
    mlp = make_mlp(3, 3, [32, 32, 32], c=c, skips=skips, dtype=dtype)
    x = points(4, 50, d_in=3, dtype=dtype)
    cond = points(*COND_LAYOUTS[layout], d_in=c, dtype=dtype, seed=7)
    check_jacobian(mlp, x, cond, dtype)


def test_cond_broadcast_in_alternating_dims():
    mlp = make_mlp(2, 2, [16, 16], c=3, skips=(1,))
    x = points(3, 4, 5, 6, d_in=2, dtype=torch.float64)
    cond = points(3, 1, 5, 1, d_in=3, dtype=torch.float64, seed=3)
    check_jacobian(mlp, x, cond, torch.float64)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("skips", [(1,), (2,), (1, 3), (1, 2, 3)], ids=str)
def test_skip_layers(skips, dtype):
    mlp = make_mlp(3, 3, [64] * 4, c=2, skips=skips, dtype=dtype)
    x = points(130, d_in=3, dtype=dtype)
    cond = points(130, d_in=2, dtype=dtype, seed=5)
    check_jacobian(mlp, x, cond, dtype)


@pytest.mark.parametrize("hidden", [[], [8], [4, 4]], ids=["single_layer", "d_out_above_width", "narrow"])
def test_small_networks(hidden):
    mlp = make_mlp(3, 16 if hidden == [8] else 3, hidden, c=1)
    x = points(33, d_in=3, dtype=torch.float64)
    check_jacobian(mlp, x, points(33, d_in=1, dtype=torch.float64, seed=2), torch.float64)


# --- the other modes ---------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("width", TEMPLATE_WIDTHS)
def test_divergence(width, dtype):
    mlp = make_mlp(4, 4, [width] * 3, c=2, dtype=dtype)
    x = points(2, 60, d_in=4, dtype=dtype)
    cond = points(2, 1, d_in=2, dtype=dtype, seed=4)
    y, div = fused("mlp_divergence", x, cond, *mlp.args())
    y64, jac64 = oracle(mlp, x, cond)
    assert_close(y, y64, dtype, "y")
    assert_close(div, jac64.diagonal(dim1=-2, dim2=-1).sum(-1), dtype, "divergence")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("k", [0, 1, 3, 16, 17, 40])
def test_jvp(k, dtype):
    """More than 16 tangents run as several passes."""
    mlp = make_mlp(3, 5, [64] * 3, c=1, dtype=dtype)
    x = points(90, d_in=3, dtype=dtype)
    cond = points(90, d_in=1, dtype=dtype, seed=8)
    tangents = points(90, k, d_in=3, dtype=dtype, seed=9)
    y, jvp = fused("mlp_jvp", x, cond, *mlp.args(), tangents)
    y64, jac64 = oracle(mlp, x, cond)
    assert_close(y, y64, dtype, "y")
    assert_close(jvp, torch.einsum("nij,nkj->nki", jac64, tangents.double()), dtype, "jvp")


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("samples", [1, 4, 16, 17, 33])
def test_hutchinson(samples, dtype):
    """With fixed noise the estimate is exactly mean_s e_s^T J e_s."""
    mlp = make_mlp(3, 3, [128] * 3, dtype=dtype)
    x = points(3, 40, d_in=3, dtype=dtype)
    noise = points(3, 40, samples, d_in=3, dtype=dtype, seed=10)
    y, div = fused("mlp_hutchinson", x, no_cond(x), *mlp.args(), noise)
    y64, jac64 = oracle(mlp, x, no_cond(x))
    e = noise.double()
    assert_close(y, y64, dtype, "y")
    assert_close(div, torch.einsum("...si,...ij,...sj->...", e, jac64, e) / samples, dtype, "hutchinson")


# --- second order -------------------------------------------------------------

def check_second_order(mlp, x, cond, dtype, noise=None):
    """The fused Laplacian, Hessian and (with noise) Hutchinson Laplacian against vmap(hessian)."""
    y64, hess = oracle_hessian(mlp, x, cond)
    results = {"laplacian": (fused("mlp_laplacian", x, cond, *mlp.args()), hess.diagonal(0, -2, -1).sum(-1)),
               "hessian": (fused("mlp_hessian", x, cond, *mlp.args()), hess)}
    if noise is not None:
        e = noise.double()
        results["laplacian_hutchinson"] = (fused("mlp_laplacian_hutchinson", x, cond, *mlp.args(), noise),
                                           torch.einsum("...sj,...ijk,...sk->...i", e, hess, e) / e.shape[-2])
    for name, ((y, out), expected) in results.items():
        assert_close(y, y64, dtype, f"{name}: y")
        assert_close(out, expected, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("act", ACTIVATION_CASES, ids=[a[0] for a in ACTIVATION_CASES])
def test_second_order_every_activation(act, dtype):
    mlp = make_mlp(3, 2, [32] * 3, c=2, act=act[1:], skips=(2,), dtype=dtype)
    x = points(2, 20, d_in=3, dtype=dtype)
    cond = points(2, 1, d_in=2, dtype=dtype, seed=4)
    check_second_order(mlp, x, cond, dtype, noise=points(2, 20, 3, d_in=3, dtype=dtype, seed=5))


@pytest.mark.parametrize("width", TEMPLATE_WIDTHS)
def test_second_order_every_width(width):
    mlp = make_mlp(3, 1, [width] * 3, act=(7, 0.0, 0.0), dtype=torch.float64)
    check_second_order(mlp, points(70, d_in=3, dtype=torch.float64), no_cond(points(70, d_in=3, dtype=torch.float64)),
                       torch.float64)


@pytest.mark.parametrize("d_in,d_out", [(1, 1), (2, 3), (5, 2), (16, 1)])
def test_second_order_in_out_dims(d_in, d_out):
    """d_in = 16 at width 32: 1 + 16 + 136 rows per point, which a width-32 tile still holds."""
    mlp = make_mlp(d_in, d_out, [32] * 2, dtype=torch.float64)
    x = points(40, d_in=d_in, dtype=torch.float64)
    check_second_order(mlp, x, no_cond(x), torch.float64)


@pytest.mark.parametrize("samples", [1, 16, 17, 33])
def test_laplacian_hutchinson_passes(samples):
    """More than 16 noise samples run as several passes, which add up their parts."""
    mlp = make_mlp(3, 3, [64] * 3, c=1, dtype=torch.float64)
    x = points(50, d_in=3, dtype=torch.float64)
    cond = points(50, d_in=1, dtype=torch.float64, seed=6)
    noise = points(50, samples, d_in=3, dtype=torch.float64, seed=7)
    y64, hess = oracle_hessian(mlp, x, cond)
    y, lap = fused("mlp_laplacian_hutchinson", x, cond, *mlp.args(), noise)
    assert_close(y, y64, torch.float64, "y")
    assert_close(lap, torch.einsum("nsj,nijk,nsk->ni", noise, hess, noise) / samples, torch.float64,
                 "laplacian_hutchinson")


@pytest.mark.parametrize("project_cond", [False, True], ids=["cond_in_tile", "cond_projected"])
@pytest.mark.parametrize("act", [(7, 0.0, 0.0), (0, 0.0, 0.0), (1, 0.0, 0.0), (3, 2.0, 1.0)],
                         ids=["tanh", "identity", "relu", "softplus_threshold"])
def test_second_order_non_finite_points(act, project_cond):
    """A point with a NaN or infinity in x (or in cond, when the tile holds it) gets NaN; the others are exact."""
    n = 40
    mlp = make_mlp(3, 2, [16, 16], c=2, act=act, last_act=act, skips=(1,))
    x = points(n, d_in=3, dtype=torch.float64)
    cond = points(1 if project_cond else n, d_in=2, dtype=torch.float64, seed=3)
    x[1, 0], x[2, 1], x[3, 2] = float("inf"), float("nan"), -float("inf")
    bad = [1, 2, 3]
    if not project_cond:
        cond[4, 0], cond[5, 1] = float("inf"), float("nan")
        bad += [4, 5]
    good = [i for i in range(n) if i not in bad]
    noise = points(n, 3, d_in=3, dtype=torch.float64, seed=4)
    _, hess = oracle_hessian(mlp, x[good], cond if project_cond else cond[good])
    e = noise[good]
    expected = {"mlp_hessian": hess, "mlp_laplacian": hess.diagonal(0, -2, -1).sum(-1),
                "mlp_laplacian_hutchinson": torch.einsum("nsj,nijk,nsk->ni", e, hess, e) / 3}
    for op, want in expected.items():
        _, out = fused(op, x, cond, *mlp.args(), *((noise,) if op == "mlp_laplacian_hutchinson" else ()))
        assert out[bad].isnan().all(), op
        assert_close(out[good], want, torch.float64, op)


def test_hessian_too_large_for_a_tile_falls_back_and_is_right():
    """d_in = 16 at width 256: 153 rows per point, more than the tile's 32: the reference path, warned."""
    mlp = make_mlp(16, 1, [256] * 2, dtype=torch.float64)
    x = points(5, d_in=16, dtype=torch.float64)
    torch.set_warn_always(True)
    try:
        with fallback_messages() as fell_back:
            y, hess = torch.ops.torchjac.mlp_hessian(x, no_cond(x), *mlp.args())[:2]
    finally:
        torch.set_warn_always(False)
    assert fell_back and "do not fit in one tile" in fell_back[0]
    assert_close(hess, oracle_hessian(mlp, x, no_cond(x))[1], torch.float64, "hessian")


# --- the glue: shapes, layouts, errors ---------------------------------------

def call_all_ops(x, cond, mlp, k=2):
    lead = x.shape[:-1]
    tangents = x.new_ones(*lead, k, x.shape[-1])
    return {
        "mlp_jacobian": fused("mlp_jacobian", x, cond, *mlp.args()),
        "mlp_divergence": fused("mlp_divergence", x, cond, *mlp.args()),
        "mlp_jvp": fused("mlp_jvp", x, cond, *mlp.args(), tangents),
        "mlp_hutchinson": fused("mlp_hutchinson", x, cond, *mlp.args(), tangents),
        "mlp_laplacian": fused("mlp_laplacian", x, cond, *mlp.args()),
        "mlp_laplacian_hutchinson": fused("mlp_laplacian_hutchinson", x, cond, *mlp.args(), tangents),
        "mlp_hessian": fused("mlp_hessian", x, cond, *mlp.args()),
    }


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 5)], ids=str)
def test_zero_points(lead):
    mlp = make_mlp(3, 3, [32], c=1)
    x = torch.zeros(*lead, 3, device=DEVICE, dtype=torch.float64)
    cond = torch.zeros(*lead, 1, device=DEVICE, dtype=torch.float64)
    out = call_all_ops(x, cond, mlp)
    expected = {"mlp_jacobian": (*lead, 3, 3), "mlp_divergence": lead, "mlp_jvp": (*lead, 2, 3),
                "mlp_hutchinson": lead, "mlp_laplacian": (*lead, 3), "mlp_laplacian_hutchinson": (*lead, 3),
                "mlp_hessian": (*lead, 3, 3, 3)}
    for name, (y, second) in out.items():
        assert y.shape == (*lead, 3), name
        assert second.shape == expected[name], name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_non_contiguous_inputs(dtype):
    mlp = make_mlp(3, 3, [32, 32], c=2, skips=(1,), dtype=dtype)
    mlp.weights = [w.t().contiguous().t() for w in mlp.weights]  # column-major weights
    x = points(80, 3, d_in=5, dtype=dtype).transpose(0, 1)[..., 1:4]  # (3, 80, 3), strided
    assert not x.is_contiguous()
    cond = points(1, 80, d_in=2, dtype=dtype, seed=3).expand(3, 80, 2)  # stride-0 dim
    tangents = points(3, 80, 2, d_in=4, dtype=dtype, seed=4)[..., 1:]  # (3, 80, 2, 3), strided
    assert not tangents.is_contiguous()
    check_jacobian(mlp, x, cond, dtype)
    y, jvp = fused("mlp_jvp", x, cond, *mlp.args(), tangents)
    _, jac64 = oracle(mlp, x, cond)
    assert_close(jvp, torch.einsum("...ij,...kj->...ki", jac64, tangents.double()), dtype, "jvp")


def test_errors_name_the_argument():
    """ValueError/TypeError with the messages of the Python checks (torchjac/ops.py)."""
    mlp = make_mlp(3, 2, [32]).to(torch.float32)
    x = points(10, d_in=3, dtype=torch.float32)
    cond = no_cond(x)
    with pytest.raises(ValueError, match=r"mlp_jacobian: weights\[1\]: expected dtype torch.float32 like x"):
        weights = list(mlp.weights)
        weights[1] = weights[1].double()
        torch.ops.torchjac.mlp_jacobian(x, cond, weights, *mlp.args()[1:])
    with pytest.raises(ValueError, match=r"weights\[0\]: expected 2 input features"):
        torch.ops.torchjac.mlp_jacobian(x[..., :2].contiguous(), cond, *mlp.args())
    with pytest.raises(ValueError, match="divergence needs d_out == d_in"):
        torch.ops.torchjac.mlp_divergence(x, cond, *mlp.args())
    with pytest.raises(ValueError, match="cond: dim 0 is 3, expected 10"):
        torch.ops.torchjac.mlp_jacobian(x, x.new_zeros(3, 0), *mlp.args())
    with pytest.raises(ValueError, match=r"tangents: expected shape \(10, 'k', 3\)"):
        torch.ops.torchjac.mlp_jvp(x, cond, *mlp.args(), x.new_zeros(10, 2, 4))
    with pytest.raises(ValueError, match=r"skip_layers: expected indices in \[1, 1\]"):
        torch.ops.torchjac.mlp_jacobian(x, cond, *mlp.args()[:4], [0])
    with pytest.raises(TypeError, match="support float32 and float64, got x of dtype torch.float16"):
        half = mlp.to(torch.float16)
        torch.ops.torchjac.mlp_jacobian(x.half(), cond.half(), *half.args())



@needs_real_gpu
def test_device_errors_name_the_argument():
    """A tensor on another device than x (the emulation has only one)."""
    mlp = make_mlp(3, 2, [32]).to(torch.float32)
    x = points(10, d_in=3, dtype=torch.float32)
    cond = no_cond(x)
    with pytest.raises(ValueError, match=r"biases\[0\]: expected device cuda:0 like x, got cpu"):
        biases = list(mlp.biases)
        biases[0] = biases[0].cpu()
        torch.ops.torchjac.mlp_jacobian(x, cond, mlp.weights, biases, *mlp.args()[2:])


# --- PyTorch integration -----------------------------------------------------

def opcheck_samples():
    mlp = make_mlp(3, 3, [32, 32], c=1, skips=(1,))
    for requires_grad in (False, True):
        x = points(2, 20, d_in=3, dtype=torch.float64).requires_grad_(requires_grad)
        cond = points(2, 1, d_in=1, dtype=torch.float64, seed=2).requires_grad_(requires_grad)
        weights = [w.clone().requires_grad_(requires_grad) for w in mlp.weights]
        biases = [b.clone().requires_grad_(requires_grad) for b in mlp.biases]
        common = (x, cond, weights, biases, mlp.activations, mlp.params, mlp.skips)
        tangents = points(2, 20, 2, d_in=3, dtype=torch.float64, seed=3)
        yield "mlp_jacobian", common
        yield "mlp_divergence", common
        yield "mlp_jvp", common + (tangents.requires_grad_(requires_grad),)
        yield "mlp_hutchinson", common + (tangents.detach(),)
        yield "mlp_laplacian", common
        yield "mlp_laplacian_hutchinson", common + (tangents.detach(),)
        yield "mlp_hessian", common


@pytest.mark.parametrize("op_name", ["mlp_jacobian", "mlp_divergence", "mlp_jvp", "mlp_hutchinson", "mlp_laplacian",
                                     "mlp_laplacian_hutchinson", "mlp_hessian"])
def test_opcheck(op_name):
    for name, args in opcheck_samples():
        if name == op_name:
            torch.library.opcheck(getattr(torch.ops.torchjac, op_name).default, args)


def _jacobian_fn(mlp):
    def fn(x, cond):
        return torch.ops.torchjac.mlp_jacobian(x, cond, *mlp.args())
    return fn


def test_compile_fullgraph():
    mlp = make_mlp(3, 3, [64, 64], dtype=torch.float32)
    fn = _jacobian_fn(mlp)
    compiled = torch.compile(fn, fullgraph=True)
    for n in (100, 257):  # a second shape exercises the fake implementation again
        x = points(n, d_in=3, dtype=torch.float32)
        expected = fn(x, no_cond(x))
        got = compiled(x, no_cond(x))
        torch.testing.assert_close(got, expected, rtol=0, atol=0)


@needs_real_gpu
def test_compile_reduce_overhead():
    """CUDA graphs replay the kernel on the capture stream: catches launches on the wrong stream."""
    mlp = make_mlp(3, 3, [64, 64], dtype=torch.float32)
    fn = _jacobian_fn(mlp)
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for step in range(4):  # warm-up, recording, then replays
        x = points(500, d_in=3, dtype=torch.float32, seed=step)
        expected = fn(x, no_cond(x))
        got = [t.clone() for t in compiled(x, no_cond(x))]
        torch.cuda.synchronize()
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=0, atol=0)


# --- fallback -----------------------------------------------------------------

FALLBACK_SCRIPT = textwrap.dedent("""
    import torch, torchjac
    w = [torch.randn(320, 3, device="cuda"), torch.randn(3, 320, device="cuda")]
    b = [torch.randn(320, device="cuda"), torch.randn(3, device="cuda")]
    x = torch.randn(50, 3, device="cuda")
    for _ in range(3):
        y, jac, _ = torch.ops.torchjac.mlp_jacobian(x, x.new_zeros(50, 0), w, b, [3, 0], [1.0, 20.0, 0.0, 0.0], [])
    torch.cuda.synchronize()
    print("SHAPES", tuple(y.shape), tuple(jac.shape))
""")


@needs_real_gpu
def test_fallback_warns_once():
    """Width 320 is past the largest template: the reference path runs, with one warning per process.

    Counted on stderr, where the warning lands whether or not PyTorch routes it
    through Python's warnings module.
    """
    result = subprocess.run([sys.executable, "-W", "always", "-c", FALLBACK_SCRIPT], capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count(FALLBACK_MESSAGE) == 1, result.stderr
    assert "hidden width" in result.stderr, result.stderr  # the warning says why
    assert "SHAPES (50, 3) (50, 3, 3)" in result.stdout


def test_fallback_is_correct():
    """Widths past the templates run the reference path and still match the oracle."""
    mlp = make_mlp(3, 3, [320, 320], c=1)
    x = points(40, d_in=3, dtype=torch.float64)
    cond = points(40, d_in=1, dtype=torch.float64, seed=2)
    y, jac, _ = torch.ops.torchjac.mlp_jacobian(x, cond, *mlp.args())
    y64, jac64 = oracle(mlp, x, cond)
    assert_close(y, y64, torch.float64, "fallback y")
    assert_close(jac, jac64, torch.float64, "fallback jacobian")


# --- compute-sanitizer --------------------------------------------------------

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
        for width in (16, 128, 256):
            args = mlp(3, 3, [width] * 2, 2, dtype, skips=(1,))
            x = torch.randn(37, 3, device="cuda", dtype=dtype)
            full = torch.randn(37, 2, device="cuda", dtype=dtype)
            shared = torch.randn(1, 2, device="cuda", dtype=dtype)
            t = torch.randn(37, 19, 3, device="cuda", dtype=dtype)
            for cond in (full, shared):
                torch.ops.torchjac.mlp_jacobian(x, cond, *args)
                torch.ops.torchjac.mlp_divergence(x, cond, *args)
                torch.ops.torchjac.mlp_jvp(x, cond, *args, t)
                torch.ops.torchjac.mlp_hutchinson(x, cond, *args, t)
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
