"""The host emulation of the CUDA kernels (tests/cuda_emulation): its own checks, the
activation math of csrc/cuda/activations.cuh against torchjac/activations.py, and the
kernel bugs it found. Runs with TORCHJAC_EMULATE_CUDA=1 (`make test` does).

Oracles: torchjac/activations.py for the activation grid (the Python source the CUDA
copy must equal) and the pure-PyTorch path (torch.ops.torchjac.mlp_reference_*) for
the non-finite rule, which is defined by that path.
"""
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from cuda_backend import EMULATED
from torchjac import activations as act

pytestmark = pytest.mark.skipif(not EMULATED, reason="runs with TORCHJAC_EMULATE_CUDA=1 (make test)")

emu = torch.ops.torchjac_emu if EMULATED else None

if EMULATED:
    from test_cuda_backward import make_mlp as make_backward_mlp
    from test_cuda_backward import output_grads
    from test_cuda_forward import fallback_messages, make_mlp, no_cond, points

MODES = ["jacobian", "divergence", "jvp", "hutchinson"]


# --- the emulator's own checks -------------------------------------------------

def test_a_race_shows_as_a_schedule_difference():
    """Threads reading a neighbour's shared-memory write: without a barrier the two schedules disagree."""
    assert emu.selftest("race_without_barrier") == "differ"
    assert emu.selftest("race_with_barrier") == "equal"


@pytest.mark.parametrize("name,message", [
    ("block_limit", "block (1025, 1, 1) is outside CUDA's limits"),
    ("grid_limit", "grid (1, 65536, 1) is outside CUDA's limits"),
    ("smem_without_attribute", "65536 bytes of dynamic shared memory exceed the kernel's limit of 49152"),
    ("smem_above_attribute", "102401 bytes of dynamic shared memory exceed the kernel's limit of 102400"),
    ("wrong_stream", "launch on a stream that is not the current stream"),
    ("memset_wrong_stream", "cudaMemsetAsync on a stream that is not the current stream"),
])
def test_launch_checks(name, message):
    if name == "smem_above_attribute":
        assert emu.selftest("smem_with_attribute") == ""
    assert message in emu.selftest(name)


def test_opt_in_limit_of_each_device_model():
    """200 KiB of dynamic shared memory may be opted into on the H100 model (227 KiB), not on the A100's (163 KiB)."""
    assert emu.selftest("attribute_200k") == ""
    emu.set_device(1)
    try:
        assert "exceeds the A100 (emulated) opt-in limit of 166912 bytes" in emu.selftest("attribute_200k")
    finally:
        emu.set_device(0)


DIVERGENT_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    from cuda_emulation import build
    build.load()
    torch.ops.torchjac_emu.selftest({name!r})
""")


@pytest.mark.parametrize("name,message", [
    ("barrier_in_branch", "divergent barrier"),
    ("two_barriers", "divergent barrier"),
    ("wmma_divergent", "divergent warp: lane 0 of warp 0 waits in a warp collective"),
    ("wmma_misaligned", "store_matrix_sync: the pointer is not 256-bit aligned"),
    ("wmma_lane_pointers", "load_matrix_sync: lanes of one warp pass different pointers, strides or layouts"),
    ("cp_async_to_global", "__pipeline_memcpy_async: the destination is not in the block's dynamic shared memory"),
])
def test_divergent_barriers_are_fatal(name, message):
    script = DIVERGENT_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), name=name)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert message in result.stderr, result.stderr[-2000:]


def test_divergent_warp_is_fatal_on_the_thread_backend():
    """With one OS thread per CUDA thread (the sanitizers' backend) a lane left alone in an MMA is reported, not
    waited for forever."""
    script = DIVERGENT_SCRIPT.format(tests=os.path.dirname(os.path.abspath(__file__)), name="wmma_divergent")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TORCHJAC_EMU_THREADS": "1"})
    assert result.returncode != 0
    assert "divergent warp" in result.stderr, result.stderr[-2000:]


def test_wmma_product_is_exact_under_any_fragment_mapping():
    """A 16x8 by 8x16 TF32 product of small integers through fragments equals the exact product, under two mappings."""
    assert emu.selftest("wmma_product") == "exact"


def test_code_that_assumes_a_fragment_mapping_is_caught():
    """Reading x[0] as a fixed matrix element gives different results under two random mappings."""
    assert emu.selftest("wmma_assumed_mapping") == "differ"


def test_cp_async_lands_at_the_wait():
    """A cp.async destination reads as NaN until the issuing thread's __pipeline_wait_prior covers its batch."""
    assert emu.selftest("cp_async") == "undefined before the wait, copied after it"


def test_fragment_seed_is_random_per_run():
    """Two processes draw different fragment mappings unless TORCHJAC_EMU_FRAGMENT_SEED fixes one."""
    script = ("import sys, torch; sys.path.insert(0, {tests!r}); from cuda_emulation import build; build.load(); "
              "print(torch.ops.torchjac_emu.fragment_seed())").format(tests=os.path.dirname(os.path.abspath(__file__)))

    unset = {k: v for k, v in os.environ.items() if k != "TORCHJAC_EMU_FRAGMENT_SEED"}

    def seed(env):
        out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
        assert out.returncode == 0, out.stderr[-2000:]
        return int(out.stdout.split()[-1])

    assert seed(unset) != seed(unset)
    assert seed({**unset, "TORCHJAC_EMU_FRAGMENT_SEED": "42"}) == 42


def test_kernels_launch_on_the_current_stream():
    """The glue passes the current stream: with another stream current, the launch checks still pass."""
    mlp = make_mlp(3, 3, [32, 32], c=1)
    x = points(20, d_in=3, dtype=torch.float64)
    cond = points(1, d_in=1, dtype=torch.float64, seed=2)
    emu.set_current_stream(2)
    try:
        y, jac, _ = torch.ops.torchjac.mlp_jacobian(x, cond, *mlp.args())
        grad_y, grad_jac = output_grads("jacobian", mlp, x, cond, None)
        torch.ops.torchjac.mlp_jacobian_backward(grad_y, grad_jac, x, cond, *mlp.args())
    finally:
        emu.set_current_stream(1)
    assert torch.isfinite(jac).all()


def test_a100_model_runs_what_fits():
    """float64 at width 256: the backward tile (196 KiB) fits an H100, not an A100, where it falls back."""
    mlp = make_backward_mlp(3, 3, [256, 256])
    x = points(20, d_in=3, dtype=torch.float64)
    grad_y, grad_jac = output_grads("jacobian", mlp, x, no_cond(x), None)
    args = (grad_y, grad_jac, x, no_cond(x), *mlp.args())
    prev = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    try:
        with fallback_messages() as on_h100:
            torch.ops.torchjac.mlp_jacobian_backward(*args)
        emu.set_device(1)
        with fallback_messages() as on_a100:
            torch.ops.torchjac.mlp_jacobian_backward(*args)
            torch.ops.torchjac.mlp_jacobian(x, no_cond(x), *mlp.args())
    finally:
        emu.set_device(0)
        torch.set_warn_always(prev)
    assert on_h100 == []
    assert on_a100 and all("backward kernels do not cover" in m for m in on_a100), on_a100


# --- activations.cuh equals activations.py ---------------------------------------

ACTIVATION_PARAMS = [
    (act.Act.IDENTITY, 0.0, 0.0), (act.Act.RELU, 0.0, 0.0), (act.Act.LEAKY_RELU, 0.1, 0.0),
    (act.Act.SOFTPLUS, 1.0, 20.0), (act.Act.SOFTPLUS, 2.0, 1.0), (act.Act.SOFTPLUS, 3.0, 4.0),
    (act.Act.SILU, 0.0, 0.0), (act.Act.GELU, 0.0, 0.0), (act.Act.GELU_TANH, 0.0, 0.0), (act.Act.TANH, 0.0, 0.0),
    (act.Act.SIGMOID, 0.0, 0.0), (act.Act.ELU, 1.0, 0.0), (act.Act.ELU, 0.7, 0.0), (act.Act.SINE, 3.0, 0.0),
]
assert {a for a, _, _ in ACTIVATION_PARAMS} == set(act.Act)


def activation_grid(code, p0, p1, dtype):
    """Kinks, thresholds and their neighbours, +-0, NaN, +-inf and a sweep of ordinary values."""
    special = [0.0, -0.0, math.nan, math.inf, -math.inf, 1.0, -1.0, 1e-30, -1e-30, 1e30, -1e30]
    if code == act.Act.SOFTPLUS:
        special += [p1 / p0, -p1 / p0]
    z = torch.tensor(special, dtype=dtype)
    neighbours = torch.cat([torch.nextafter(z, torch.full_like(z, math.inf)),
                            torch.nextafter(z, torch.full_like(z, -math.inf))])
    sweep = torch.linspace(-30, 30, 601, dtype=dtype)
    return torch.cat([z, neighbours[torch.isfinite(neighbours)], sweep])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("code,p0,p1", ACTIVATION_PARAMS, ids=[f"{a.name.lower()}_{p0}_{p1}" for a, p0, p1 in ACTIVATION_PARAMS])
def test_activation_math_equals_python(code, p0, p1, dtype):
    """Value, first and second derivative: the same NaNs, infinities and (up to libm rounding) values."""
    z = activation_grid(code, p0, p1, dtype)
    got = emu.activation(int(code), p0, p1, z)
    expected = (act.value(code, p0, p1, z), act.derivative(code, p0, p1, z), act.second_derivative(code, p0, p1, z))
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for what, g, e in zip(("value", "d1", "d2"), got, expected):
        e = e.expand_as(z).to(dtype)
        if what == "value" and code == act.Act.GELU and dtype == torch.float32:
            # PyTorch's float32 GELU overflows at the top of the range: NaN at +inf (float64 gives inf, the limit,
            # as the kernel does) and inf at the largest float (the kernel gives that float).
            keep = z < torch.finfo(dtype).max
            g, e = g[keep], e[keep]
        bad = torch.isnan(g) != torch.isnan(e)
        assert not bad.any(), f"{what}: NaN differs at z = {z[bad].tolist()}: got {g[bad].tolist()}, want {e[bad].tolist()}"
        torch.testing.assert_close(g, e, rtol=tol, atol=tol, equal_nan=True, msg=lambda m: f"{what}: {m}")


# --- the non-finite rule of the CPU path ------------------------------------------

def non_finite_case(code):
    """Points with a NaN or infinite x or cond entry among ordinary ones; infinite inputs saturate a Tanh."""
    mlp = make_mlp(3, 3, [32, 32], c=2, act=(code, 0.0, 0.0), last_act=(code, 0.0, 0.0), skips=(1,))
    x = points(12, d_in=3, dtype=torch.float64)
    cond = points(12, d_in=2, dtype=torch.float64, seed=3)
    x[1, 0] = math.nan
    x[4, 2] = math.inf
    x[5, 1] = -math.inf
    cond[7, 1] = math.inf
    cond[9, 0] = math.nan
    return mlp, x, cond


def extra_for(mode, x):
    if mode in ("jvp", "hutchinson"):
        return (points(12, 2, d_in=3, dtype=torch.float64, seed=9),)
    return ()


def assert_same_as_reference(got, expected, what):
    for g, e in zip(got, expected):
        assert torch.equal(torch.isnan(g), torch.isnan(e)), f"{what}: NaN pattern differs"
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-10, equal_nan=True)


@pytest.mark.parametrize("code", [int(act.Act.TANH), int(act.Act.RELU), int(act.Act.IDENTITY)], ids=["tanh", "relu", "identity"])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_points_forward(mode, code):
    mlp, x, cond = non_finite_case(code)
    extra = extra_for(mode, x)
    got = getattr(torch.ops.torchjac_emu, f"mlp_{mode}")(x, cond, *mlp.args(), *extra)
    expected = torch.ops.torchjac.mlp_reference_forward(mode, x, cond, *mlp.args(), extra[0] if extra else None)
    assert_same_as_reference(got, expected, f"{mode} forward")


@pytest.mark.parametrize("code", [int(act.Act.TANH), int(act.Act.RELU), int(act.Act.IDENTITY)], ids=["tanh", "relu", "identity"])
@pytest.mark.parametrize("mode", MODES)
def test_non_finite_points_backward(mode, code):
    mlp, x, cond = non_finite_case(code)
    extra = extra_for(mode, x)
    grad_y, grad_out = output_grads(mode, mlp, x, cond, extra[0] if extra else None)
    args = (grad_y, grad_out, x, cond, *mlp.args())
    got = getattr(torch.ops.torchjac_emu, f"mlp_{mode}_backward")(*args, *extra)
    expected = torch.ops.torchjac.mlp_reference_backward(mode, *args, extra[0] if extra else None)
    flat = lambda gs: [gs[0], gs[1], *gs[2], *gs[3]] + ([gs[4]] if mode == "jvp" else [])
    assert_same_as_reference(flat(got), flat(expected), f"{mode} backward")


# --- kernel attributes and plans ---------------------------------------------------

def backward_call(c, n=40, direct=True):
    """One jacobian backward at width 64 in float32 (a tile above 48 KiB); c changes its shared memory."""
    mlp = make_backward_mlp(3, 3, [64, 64], c=c, dtype=torch.float32)
    x = points(n, d_in=3, dtype=torch.float32)
    cond = points(n, d_in=c, dtype=torch.float32, seed=2)
    grad_y, grad_jac = output_grads("jacobian", mlp, x, cond, None)
    ops = torch.ops.torchjac_emu if direct else torch.ops.torchjac
    return ops.mlp_jacobian_backward(grad_y, grad_jac, x, cond, *mlp.args())


def test_shared_memory_limit_is_raised_once_and_never_lowered():
    """A per-kernel setting: lowering it lets a concurrent call launch past the limit (docs/cuda.md)."""
    for c in (40, 4, 40, 4):  # larger, then smaller tiles on the same kernel
        backward_call(c)
    sets = emu.stat("func_set_attribute")
    assert emu.stat("attribute_lowered") == 0
    wide = make_mlp(3, 3, [256, 256], dtype=torch.float64)  # a forward tile above 48 KiB
    x = points(30, d_in=3, dtype=torch.float64)
    for c in (40, 4):
        backward_call(c)
        torch.ops.torchjac_emu.mlp_jacobian(x, no_cond(x), *wide.args())
    assert emu.stat("func_set_attribute") == sets, "cudaFuncSetAttribute ran again after the first calls"


def test_plan_is_computed_once_per_call():
    backward_call(4)  # the first call on the device may set it up
    emu.reset_stats()
    backward_call(4)
    assert emu.stat("occupancy_queries") == 1
    assert emu.stat("func_set_attribute") == 0
    assert emu.stat("launches") == 2  # the main kernel and the reduction
