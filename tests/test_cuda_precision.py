"""The float32 precision modes of the fused CUDA kernels against a float64 oracle,
within the error bound stated in docs/cuda.md, "Precision".

PyTorch's float32 matmul precision picks how the hidden-layer products multiply:
"highest" a 3xTF32 split, "high" TF32, "medium" BF16 tensor cores, all with FP32
accumulation. The bound is first order and per entry: layer l's product, with
fan-in K_l, is off by at most eps(K_l) * (|W_l| |a_{l-1}|) in each pre-activation
row (value and tangents), each activation adds ACTIVATION_ERROR * |a_l|, and
these errors reach the outputs through the network's own sensitivities, which
float64 autograd gives here. The test allows twice the bound (second-order terms).

Oracles: the values from the float64 vmap(jacrev) oracle of test_cuda_forward.py;
the bound from a float64 tangent-row forward written here. Neither shares code
with torchjac. Runs on a CUDA device or in the host emulation (TORCHJAC_EMULATE_CUDA=1),
where it also checks that the tensor-core path ran (one warp collective per MMA).
"""
import contextlib
import math

import pytest
import torch
from torch.func import jacrev, vmap

import torchjac  # noqa: F401
from cuda_backend import EMULATED, requires_kernels
from test_cuda_forward import (ACTIVATION_CASES, ORACLE_ACTIVATIONS, SOFTPLUS, fused, make_mlp, max_rel_err,
                               no_cond, oracle, oracle_hessian, points)

pytestmark = requires_kernels

MODES = ["highest", "high", "medium"]
TF32_ROUNDOFF = 2.0**-11
BF16_ROUNDOFF = 2.0**-8
ACCUMULATION = 2.0**-23  # FP32 unit roundoff, doubled: tensor cores may truncate when they accumulate
ACTIVATION_ERROR = 16 * 2.0**-24  # act, act', act'' and their products with the tangents, in float32
LAMBDA = 8.0  # probabilistic bound: standard deviations allowed


def product_error(mode, fan_in, tensor_cores=True):
    """eps(K): the worst-case error of one product entry relative to sum_k |w_k a_k|, for fan-in K; a
    product that stays SIMT is FP32: K u."""
    if not tensor_cores:
        return fan_in * 2.0**-24
    return input_roundoff(mode) * (3 if mode == "highest" else 2) + accumulation_error(mode, fan_in)


def takes_tensor_cores(mode, weights, layer, d_out):
    """docs/cuda.md's rule for the forward: the hidden width H a multiple of 16 (else the call runs SIMT);
    then a product takes the tensor cores if its outputs are a multiple of 16, its fan-in of 8 (16 for
    BF16), and its first input column (H for layer 0, 0 otherwise) of 8."""
    hidden = weights[0].shape[0] if len(weights) > 1 else 0
    if hidden == 0 or hidden % 16:
        return False
    out, fan_in = weights[layer].shape
    col0 = max(hidden, d_out) if layer == 0 else 0
    return out % 16 == 0 and fan_in % (16 if mode == "medium" else 8) == 0 and col0 % 8 == 0


def input_roundoff(mode):
    """The relative error of one product term from rounding its inputs: TF32 or BF16 unit roundoff, or for the
    3xTF32 split the dropped lo * lo term and the roundings of the lo parts, u_tf32^2 each."""
    return {"highest": TF32_ROUNDOFF**2, "high": TF32_ROUNDOFF, "medium": BF16_ROUNDOFF}[mode]


def accumulation_error(mode, fan_in):
    """FP32 accumulation of K terms (3K for the split), taken as biased: it adds up linearly."""
    return (3 if mode == "highest" else 1) * fan_in * ACCUMULATION


@contextlib.contextmanager
def matmul_precision(mode):
    prev = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(mode)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(prev)


def warp_collectives():
    return torch.ops.torchjac_emu.stat("warp_collectives") if EMULATED else None


def _flat_points(x, cond):
    """x as (points, d_in) and each point's cond row as (points, c), in float64."""
    xs = x.detach().reshape(-1, x.shape[-1]).double()
    c = cond.shape[-1]
    return xs, cond.detach().expand(*x.shape[:-1], c).reshape(xs.shape[0], c).double()


def _act_derivatives(code, p0, p1, z):
    """act(z), act'(z), act''(z), element-wise, by forward-over-forward autodiff of the oracle's activation."""
    f = ORACLE_ACTIVATIONS[code]

    def value_and_slope(v):
        return torch.func.jvp(lambda u: f(u, p0, p1), (v,), (torch.ones_like(v),))

    (value, slope), (_, curvature) = torch.func.jvp(value_and_slope, (z,), (torch.ones_like(z),))
    return value, slope, curvature


def row_bounds(mlp, x, cond, mode, tangents=None, second_order=None):
    """Bounds on the errors of each point's output rows [y; J v_1; ..; J v_k] (tangents (..., k, d_in),
    default the basis of x), then with second_order="laplacian" the collapsed row sum_j d2y/dx_j^2, with
    "hessian" one row per pair a <= b (torch.triu_indices order), in float64, as docs/cuda.md states them:
    (worst case, probabilistic), each shaped (..., rows, d_out). Both propagate each layer's errors through the
    network's sensitivities s = d out / d (pre-activation or output rows), from float64 autograd:
      worst case:    sum |s| * (eps(K) |W| |a| on the products, ACTIVATION_ERROR |a_l| on the activations);
      probabilistic: LAMBDA * sqrt(sum s^2 var) + sum |s| K u_acc |W| |a|, where the input roundings are
                     independent with variance u^2/3 per rounded factor (two per term), and the
                     accumulation is kept worst case (tensor cores may truncate: biased)."""
    ws = [w.detach().double() for w in mlp.weights]
    bs = [b.detach().double() for b in mlp.biases]
    xs, cs = _flat_points(x, cond)
    d_in, c = xs.shape[-1], cs.shape[-1]
    if tangents is None:
        tangents = torch.eye(d_in, dtype=torch.float64).expand(*x.shape[:-1], d_in, d_in)
    k = tangents.shape[-2]
    vs = tangents.detach().reshape(-1, k, d_in).double()
    pairs = torch.triu_indices(k, k).tolist() if second_order == "hessian" else None
    m = {None: 0, "laplacian": 1, "hessian": k * (k + 1) // 2}[second_order]
    u_in = input_roundoff(mode)
    factors = 3 if mode == "highest" else 2

    def rows(xp, cp, vp, deltas, etas):
        """The kernels' rows [h; t_1..t_k] through the layers, deltas added to the pre-activation rows and
        etas to the output rows of each layer; also each layer's |a| |W|^T, a^2 (W^2)^T and |output rows|."""
        x_rows = torch.cat([xp[None], vp, vp.new_zeros(m, d_in)])  # x's second derivatives are 0
        c_rows = torch.cat([cp[None], cp.new_zeros(k + m, c)])
        r, aux = None, []
        for layer, (w, b) in enumerate(zip(ws, bs)):
            if layer == 0:
                inp = torch.cat([x_rows, c_rows], 1)
            elif layer in mlp.skips:
                inp = torch.cat([r, x_rows, c_rows], 1)
            else:
                inp = r
            zrows = inp @ w.T + torch.cat([b[None], b.new_zeros(k + m, b.shape[0])]) + deltas[layer]
            value, slope, curvature = _act_derivatives(mlp.activations[layer], mlp.params[2 * layer],
                                                       mlp.params[2 * layer + 1], zrows[0])
            tz, sz = zrows[1:1 + k], zrows[1 + k:]
            if second_order == "laplacian":  # the tangents before they are scaled, as the kernels do
                sz = slope * sz + curvature * tz.square().sum(0)
            elif second_order == "hessian":
                sz = slope * sz + curvature * torch.stack([tz[a] * tz[b] for a, b in zip(*pairs)])
            r = torch.cat([value[None], slope * tz, sz]) + etas[layer]
            aux.append((inp.abs() @ w.abs().T, inp.square() @ w.square().T, r.abs()))
        return r, aux

    zeros = [xs.new_zeros(xs.shape[0], 1 + k + m, w.shape[0]) for w in ws]  # the perturbations, at 0

    def point_bounds(xp, cp, vp, dz, da):
        sens, aux = jacrev(rows, argnums=(3, 4), has_aux=True)(xp, cp, vp, dz, da)
        worst, var, acc = 0, 0, 0
        for layer, w in enumerate(ws):
            fan_in = w.shape[1]
            tc = takes_tensor_cores(mode, ws, layer, ws[-1].shape[0])
            s_z, s_a = sens[0][layer], sens[1][layer]
            abs_prod, sq_prod, out = aux[layer]
            worst = worst + (s_z.abs() * (product_error(mode, fan_in, tc) * abs_prod)).sum((-2, -1))
            worst = worst + (s_a.abs() * (ACTIVATION_ERROR * out)).sum((-2, -1))
            if tc:
                var = var + (s_z.square() * (factors * u_in**2 / 3 * sq_prod)).sum((-2, -1))
            var = var + (s_a.square() * (ACTIVATION_ERROR**2 / 3 * out.square())).sum((-2, -1))
            accumulation = accumulation_error(mode, fan_in) if tc else product_error(mode, fan_in, False)
            acc = acc + (s_z.abs() * (accumulation * abs_prod)).sum((-2, -1))
        return worst, LAMBDA * var.sqrt() + acc  # each (1 + k, d_out)

    worst, probable = vmap(point_bounds)(xs, cs, vs, zeros, zeros)
    shape = (*x.shape[:-1], 1 + k + m, ws[-1].shape[0])
    return worst.reshape(shape), probable.reshape(shape)


def error_bound(mlp, x, cond, mode):
    """row_bounds for the basis tangents, as (y, J) pairs: ((worst y, worst J), (probable y, probable J))."""
    def split(b):  # rows (..., 1 + d_in, d_out) -> (y bound, J bound)
        return b[..., 0, :], b[..., 1:, :].transpose(-1, -2)

    worst, probable = row_bounds(mlp, x, cond, mode)
    return split(worst), split(probable)


def kink_distance(mlp, x, cond, kink_at):
    """Per point: min over layers and units of |z - kink_at| / (|W| |a| + |b|) for the value row, in float64:
    how close a pre-activation comes to the kink, relative to the size of its terms."""
    xs, cs = _flat_points(x, cond)
    h, nearest = None, None
    for layer, (w, b) in enumerate(zip(mlp.weights, mlp.biases)):
        w, b = w.detach().double(), b.detach().double()
        inp = torch.cat([xs, cs], 1) if layer == 0 else torch.cat([h, xs, cs], 1) if layer in mlp.skips else h
        z = inp @ w.T + b
        ratio = ((z - kink_at).abs() / (inp.abs() @ w.abs().T + b.abs())).amin(1)
        nearest = ratio if nearest is None else torch.minimum(nearest, ratio)
        h = ORACLE_ACTIVATIONS[mlp.activations[layer]](z, mlp.params[2 * layer], mlp.params[2 * layer + 1])
    return nearest.reshape(x.shape[:-1])


def kink_margin(mlp, mode):
    """The stated band around a kink, relative to |W| |a| + |b|, inside which a rounding error may move a
    pre-activation across it: LAMBDA standard deviations of the input roundings of L layers (two per term)."""
    return LAMBDA * math.sqrt(2 * len(mlp.weights) / 3) * input_roundoff(mode)


MIN_CHECKED = 0.1  # with kinks, at least this share of the points (30 of 300) must be away from them: checked in full


def bound_ratio(err, bound):
    return torch.where(err == 0, torch.zeros_like(err), err / bound)


def check_within_bound(mlp, x, cond, mode, expect_tensor_cores=True, kink_at=None):
    """Runs mlp_jacobian in float32 under `mode`; checks y and J against both bounds. At a kink (kink_at: the
    pre-activation where the activation's slope, or with Softplus's threshold its value, jumps), the outputs
    jump where an error moves a pre-activation across it, at any precision: entries over the bound are
    allowed only at points within kink_margin of it."""
    mlp32, x32, cond32 = mlp.to(torch.float32), x.float(), cond.float()
    before = warp_collectives()
    with matmul_precision(mode):
        y, jac = fused("mlp_jacobian", x32, cond32, *mlp32.args())
    if EMULATED:
        ran = warp_collectives() > before
        assert ran == expect_tensor_cores, f"tensor-core path ran: {ran}, expected {expect_tensor_cores}"
    y64, jac64 = oracle(mlp32, x32, cond32)
    worst, probable = error_bound(mlp32, x32, cond32, mode)
    kinks = kink_at is not None
    near_kink = kink_distance(mlp32, x32, cond32, kink_at) <= kink_margin(mlp32, mode) if kinks else None
    if kinks:
        checked = 1.0 - near_kink.float().mean().item()
        assert checked >= MIN_CHECKED, f"{mode}: only {checked:.0%} of the points are away from the kinks"
    for i, (what, got, want) in enumerate((("y", y, y64), ("jacobian", jac, jac64))):
        err = (got.double() - want).abs()
        for name, bound, allowed in (("worst-case", worst[i], 2.0), ("probabilistic", probable[i], 1.0)):
            ratio = bound_ratio(err, bound)
            if kinks:
                over = ratio.flatten(near_kink.dim()).amax(-1) > allowed
                assert not (over & ~near_kink).any(), f"{mode}: {what} over the {name} bound away from any kink"
                ratio = ratio[~near_kink]
            worst_ratio = ratio.max().item() if ratio.numel() else 0.0
            assert worst_ratio <= allowed, (f"{mode} {what}: error {err.max().item():.3e} is {worst_ratio:.2f}x "
                                            f"the {name} bound (largest bound {bound.max().item():.3e})")
    if not kinks and jac.shape[-1] == jac.shape[-2]:  # the divergence: the trace, within the trace of the bounds
        with matmul_precision(mode):
            _, div = fused("mlp_divergence", x32, cond32, *mlp32.args())
        err = (div.double() - jac64.diagonal(dim1=-2, dim2=-1).sum(-1)).abs()
        for name, bound in (("worst-case", worst[1]), ("probabilistic", probable[1])):
            ratio = bound_ratio(err, bound.diagonal(dim1=-2, dim2=-1).sum(-1)).max().item()
            assert ratio <= (2.0 if name == "worst-case" else 1.0), f"{mode} divergence: {ratio:.2f}x the {name} bound"
    return max_rel_err(jac, jac64)


def kink_of(code, p0, p1):
    """Where the activation's slope (or value) jumps: ReLU, LeakyReLU, ELU with alpha != 1 at 0, Softplus at
    its threshold (beta z > threshold is linear: PyTorch's value jumps there); None if it is smooth enough."""
    if code in (1, 2) or (code == 9 and p0 != 1.0):
        return 0.0
    if code == 3:
        return p1 / p0
    return None


# (width, hidden layers): widths 16-256, depths 1-8. One hidden layer has no hidden-to-hidden product.
GRID = [(16, 8), (32, 1), (32, 6), (64, 4), (128, 3), (256, 2)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("width,depth", GRID, ids=[f"w{w}_d{d}" for w, d in GRID])
def test_grid_within_bound(width, depth, mode):
    mlp = make_mlp(3, 3, [width] * depth, act=SOFTPLUS, seed=width + depth)
    x = points(40, d_in=3, dtype=torch.float64)
    check_within_bound(mlp, x, no_cond(x), mode, expect_tensor_cores=depth > 1)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", ACTIVATION_CASES, ids=[a[0] for a in ACTIVATION_CASES])
def test_every_activation_within_bound(act, mode):
    _, code, p0, p1 = act
    kink_at = kink_of(code, p0, p1)
    # with a kink, a smaller net and more points: enough of them stay away from every unit's kink
    hidden, n = ([32] * 3, 24) if kink_at is None else ([16] * 2, 300)
    mlp = make_mlp(3, 2, hidden, act=(code, p0, p1), last_act=(code, p0, p1))
    x = points(n, d_in=3, dtype=torch.float64)
    check_within_bound(mlp, x, no_cond(x), mode, kink_at=kink_at)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("cond_rows", ["per_point", "shared"])
def test_cond_and_skips_within_bound(cond_rows, mode):
    """cond columns in the tile (per point) or projected once (shared), and a skip layer reading [h, x, cond]."""
    mlp = make_mlp(3, 3, [64] * 4, c=5, skips=(2,), seed=3)
    x = points(2, 20, d_in=3, dtype=torch.float64)
    cond = points(2, 20 if cond_rows == "per_point" else 1, d_in=5, dtype=torch.float64, seed=4)
    check_within_bound(mlp, x, cond, mode)


@pytest.mark.parametrize("mode", MODES)
def test_jvp_and_hutchinson_within_bound(mode):
    """Given tangents and Rademacher noise: J v within the rows' bounds; the Hutchinson estimate
    mean_s e_s . (J e_s) within mean_s |e_s| . bound(J e_s) (the final dot product adds 16 u of its terms)."""
    mlp = make_mlp(3, 3, [64] * 3, c=2, seed=7).to(torch.float32)
    x = points(30, d_in=3, dtype=torch.float32)
    cond = points(30, d_in=2, dtype=torch.float32, seed=8)
    tangents = points(30, 2, d_in=3, dtype=torch.float32, seed=9)
    noise = (torch.randint(0, 2, (30, 4, 3), generator=torch.Generator().manual_seed(10)) * 2 - 1).to(x)
    _, jac64 = oracle(mlp, x, cond)
    with matmul_precision(mode):
        _, jvp = fused("mlp_jvp", x, cond, *mlp.args(), tangents)
        _, hutch = fused("mlp_hutchinson", x, cond, *mlp.args(), noise)
    cases = {"jvp": (jvp, torch.einsum("nij,nkj->nki", jac64, tangents.double()), tangents)}
    e = noise.double()
    je = torch.einsum("nij,nsj->nsi", jac64, e)
    cases["hutchinson"] = (hutch, (e * je).sum(-1).mean(-1), noise)
    for what, (got, want, directions) in cases.items():
        worst, probable = row_bounds(mlp, x, cond, mode, directions)
        err = (got.double() - want).abs()
        for name, rows, allowed in (("worst-case", worst, 2.0), ("probabilistic", probable, 1.0)):
            bound = rows[..., 1:, :]
            if what == "hutchinson":
                bound = ((e.abs() * bound).sum(-1) + 16 * 2.0**-24 * (e * je).abs().sum(-1)).mean(-1)
            ratio = bound_ratio(err, bound).max().item()
            assert ratio <= allowed, f"{mode} {what}: {ratio:.2f}x the {name} bound"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act", [("tanh", 7, 0.0, 0.0), ("softplus", 3, 1.0, 20.0), ("sine", 10, 3.0, 0.0)],
                         ids=lambda a: a[0])
def test_second_order_within_bound(act, mode):
    """The Laplacian's collapsed row and the Hessian's pair rows through the same products, against
    vmap(hessian), within their rows' bounds (the rows' act'' term included)."""
    _, code, p0, p1 = act
    mlp = make_mlp(3, 2, [64] * 3, act=(code, p0, p1), last_act=(code, p0, p1), seed=11).to(torch.float32)
    x = points(20, d_in=3, dtype=torch.float32)
    cond = no_cond(x)
    _, hess = oracle_hessian(mlp, x, cond)
    with matmul_precision(mode):
        _, lap = fused("mlp_laplacian", x, cond, *mlp.args())
        _, hes = fused("mlp_hessian", x, cond, *mlp.args())
    a, b = torch.triu_indices(3, 3)
    for what, got, want in (("laplacian", lap, hess.diagonal(0, -2, -1).sum(-1)),
                            ("hessian", hes[..., a, b].transpose(-1, -2), hess[..., a, b].transpose(-1, -2))):
        worst, probable = row_bounds(mlp, x, cond, mode, second_order=what)
        err = (got.double() - want).abs()
        for name, rows, allowed in (("worst-case", worst, 2.0), ("probabilistic", probable, 1.0)):
            bound = rows[..., 4, :] if what == "laplacian" else rows[..., 4:, :]
            ratio = bound_ratio(err, bound).max().item()
            assert ratio <= allowed, f"{mode} {what}: {ratio:.2f}x the {name} bound"


def test_width_off_the_tensor_core_grid_runs_simt():
    """Width 40 is not a multiple of 16: every product stays SIMT, FP32-accurate whatever the precision."""
    mlp = make_mlp(3, 3, [40] * 3)
    x = points(30, d_in=3, dtype=torch.float64)
    err = check_within_bound(mlp, x, no_cond(x), "medium", expect_tensor_cores=False)
    assert err <= 1e-5


def test_precision_modes_differ_as_stated():
    """"highest" is FP32-accurate (within today's 1e-5); TF32 and BF16 are measurably coarser, BF16 the coarsest."""
    mlp = make_mlp(3, 3, [128] * 3, seed=5)
    x = points(40, d_in=3, dtype=torch.float64)
    errs = {mode: check_within_bound(mlp, x, no_cond(x), mode) for mode in MODES}
    assert errs["highest"] <= 1e-5, errs
    assert errs["highest"] < errs["high"] < errs["medium"], errs


def _has_per_backend_precision():
    try:
        torch.backends.cuda.matmul.fp32_precision
    except (AttributeError, RuntimeError):
        return False
    return True


@pytest.mark.skipif(not _has_per_backend_precision(), reason="torch without torch.backends.cuda.matmul.fp32_precision")
def test_per_backend_tf32_setting_is_read():
    """torch.backends.cuda.matmul.fp32_precision = "tf32" (the per-backend API) gives TF32, as "high" does."""
    mlp = make_mlp(3, 3, [64] * 3, seed=6).to(torch.float32)
    x = points(20, d_in=3, dtype=torch.float32)
    with matmul_precision("high"):
        _, jac_high = fused("mlp_jacobian", x, no_cond(x), *mlp.args())
    prev = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        _, jac_tf32 = fused("mlp_jacobian", x, no_cond(x), *mlp.args())
    finally:
        torch.backends.cuda.matmul.fp32_precision = prev
    _, jac_highest = fused("mlp_jacobian", x, no_cond(x), *mlp.args())
    assert torch.equal(jac_tf32, jac_high)
    assert not torch.equal(jac_highest, jac_high)


# --- the backward kernels -----------------------------------------------------

BACKWARD_GRID = [(32, 3), (64, 4), (128, 2), (256, 2)]


@pytest.mark.parametrize("mode", ["high", "medium"])
@pytest.mark.parametrize("width,depth", BACKWARD_GRID, ids=[f"w{w}_d{d}" for w, d in BACKWARD_GRID])
def test_backward_within_tolerance(width, depth, mode):
    """Gradients of jacobian and divergence losses under TF32 and BF16: every gradient within twice the forward
    J's probabilistic bound, relative to its largest entry (the backward runs the forward's products again and
    their transposes: twice as many roundings on a path). "highest" is held to 1e-5 by test_cuda_backward.py."""
    from test_cuda_backward import fused_backward, oracle_grads, output_grads

    mlp = make_mlp(3, 3, [width] * depth, seed=width).to(torch.float32)
    x = points(2, 24, d_in=3, dtype=torch.float32)
    cond = no_cond(x)
    _, probable = error_bound(mlp, x, cond, mode)
    _, jac64 = oracle(mlp, x, cond)
    allowed = 2 * (probable[1].max() / jac64.abs().max()).item()
    for op in ("jacobian", "divergence"):
        grad_y, grad_out = output_grads(op, mlp, x, cond, None)
        before = warp_collectives()
        with matmul_precision(mode):
            got = fused_backward(op, mlp, x, cond, grad_y, grad_out, None)
        if EMULATED:
            assert warp_collectives() > before, "the backward did not run on the tensor-core path"
        expected = oracle_grads(op, mlp, x, cond, grad_y, grad_out, None)
        for name, want in expected.items():
            err = max_rel_err(got[name], want)
            assert err <= allowed, f"{mode} {op} {name}: relative error {err:.3e} > {allowed:.3e}"


# --- where the tensor cores do not run (emulation: its device models) ---------------------------------

@pytest.mark.skipif(not EMULATED, reason="the emulation's device models (a V100, an A100)")
@pytest.mark.parametrize("device,c,tensor_cores", [(2, 5, False), (1, 600, False), (0, 600, True)],
                         ids=["v100_sm70", "a100_tc_layout_too_big", "h100"])
def test_simt_where_tensor_cores_cannot_run(device, c, tensor_cores):
    """sm_70 has no TF32/BF16 tensor cores: SIMT. Width 256 with 600 cond columns per point: the tensor-core
    layout (its stride, double-buffered staging) exceeds an A100's 163 KiB and the call runs the SIMT layout
    instead of falling back; an H100's 227 KiB holds it. Every case fused, within the bound of what ran."""
    mlp = make_mlp(3, 3, [256] * 2, c=c, seed=12).to(torch.float32)
    x = points(12, d_in=3, dtype=torch.float32)
    cond = 0.05 * points(12, d_in=c, dtype=torch.float32, seed=13)
    torch.ops.torchjac_emu.set_device(device)
    try:
        before = warp_collectives()
        with matmul_precision("high"):
            _, jac = fused("mlp_jacobian", x, cond, *mlp.args())
        ran = warp_collectives() > before
    finally:
        torch.ops.torchjac_emu.set_device(0)
    assert ran == tensor_cores
    _, jac64 = oracle(mlp, x, cond)
    err = max_rel_err(jac, jac64)
    assert err <= (1e-2 if tensor_cores else 1e-5), err
