"""GPU benchmark of the fused CUDA forward kernels against the ways users compute these today.

Models: 3 -> [width] * 4 -> 3, Softplus, float32, widths 128 (headline), 64 and 256.
Points: 1M and 16M, plus one 100M-point call of each mode on the headline model.
Modes, each as one op call of torch.ops.torchjac:
  jacobian    J (N, 3, 3)
  divergence  exact trace of J
  hutchinson  one noise sample: e^T J e
  jvp         one tangent: J v
Methods, all timed in the same run:
  fused          torch.ops.torchjac.mlp_<mode> (csrc/cuda/mlp_forward.cu)
  reference      torch.ops.torchjac.mlp_reference_forward, torchjac's pure-PyTorch path
  vmap(jvp)      torch.func forward mode, one jvp per tangent (hutchinson, jvp)
  vmap(jacfwd)   full J with torch.func forward mode, then the mode's quantity
  vmap(jacrev)   full J with torch.func reverse mode, then the mode's quantity
  autograd       torch.autograd: one grad call per output (jacobian, divergence),
                 one vector-Jacobian product (hutchinson), forward-mode duals (jvp)
  compile(best)  torch.compile of the fastest baseline of that row, where it compiles

Every method is checked against a float64 vmap(jacrev) oracle (first and last
points of the full-size output) before it is timed; a failed check is reported
and the method is not timed. Reported per method: median time (CUDA events,
after warm-up), speed-up of fused over it, achieved TFLOP/s counted with the
same useful FLOPs for every method (2 (1 + k) sum_l out_l in_l per point, k =
tangents) and its fraction of the device's FP32 peak, peak memory
(torch.cuda.max_memory_allocated) and the extra memory beyond inputs and outputs.

    python bench/bench_gpu_forward.py --out bench/out/gpu [--quick] [--no-compile]

Writes results.json and results.txt (everything printed) to --out, with the
device name, driver, torch and CUDA versions and the git commit.
"""
import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import torch

DEVICE = "cuda"
D = 3
DEPTH = 4
SOFTPLUS = (3, 1.0, 20.0)
IDENTITY = (0, 0.0, 0.0)
MODES = ("jacobian", "divergence", "hutchinson", "jvp")
CHECK_POINTS = 1024  # oracle-checked at each end of the output
FP32_TOL = 1e-4      # relative to the largest entry; a gate against wrong results, not a precision test
# The same gate per float32 matmul precision ("high": TF32, "medium": BF16 tensor cores, for the fused kernels
# and for cuBLAS in the baselines). The stated error bounds are tested in tests/test_cuda_precision.py.
PRECISION_TOL = {"highest": FP32_TOL, "high": 2e-2, "medium": 1e-1}

# FP32 (non-tensor-core) peak TFLOP/s by device-name substring, most specific first.
FP32_PEAKS = [
    ("H100 SXM", 66.9), ("H100 NVL", 60.0), ("H100 PCIe", 51.2), ("H100", 66.9), ("H200", 66.9), ("GH200", 66.9),
    ("B200", 80.0), ("A100", 19.5), ("A10G", 31.2), ("A10", 31.2), ("L40S", 91.6), ("L40", 90.5), ("L4", 30.3),
    ("RTX 4090", 82.6), ("RTX 3090", 35.6), ("V100", 15.7), ("T4", 8.1),
]


class Tee:
    """Prints and keeps every line for results.txt."""

    def __init__(self):
        self.lines = []

    def __call__(self, *parts):
        line = " ".join(str(p) for p in parts)
        print(line, flush=True)
        self.lines.append(line)


log = Tee()


# ---- environment ---------------------------------------------------------------

def run_quiet(cmd):
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
    except Exception:
        return ""


def device_peak(name):
    for key, peak in FP32_PEAKS:
        if key.lower() in name.lower():
            return peak, f"FP32 SIMT peak of {key} (table)"
    props = torch.cuda.get_device_properties(0)
    clock_mhz = run_quiet(["nvidia-smi", "--query-gpu=clocks.max.sm", "--format=csv,noheader,nounits"])
    try:
        mhz = float(clock_mhz.splitlines()[0])
        peak = props.multi_processor_count * 128 * 2 * mhz * 1e6 / 1e12
        return peak, f"estimated: {props.multi_processor_count} SMs x 128 FP32 lanes x 2 x {mhz:.0f} MHz"
    except (ValueError, IndexError):
        return float("nan"), "unknown device: no FP32 peak"


def environment():
    name = torch.cuda.get_device_name(0)
    peak, peak_source = device_peak(name)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return {
        "device": name,
        "driver": run_quiet(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": run_quiet(["git", "-C", repo, "rev-parse", "HEAD"]) or "unknown",
        "git_dirty": bool(run_quiet(["git", "-C", repo, "status", "--porcelain"])),
        "fp32_peak_tflops": peak,
        "fp32_peak_source": peak_source,
    }


# ---- the model -----------------------------------------------------------------

def make_model(width, dtype=torch.float32):
    """Weights as the op arguments, and the same MLP as an nn.Sequential for the baselines."""
    gen = torch.Generator().manual_seed(0)
    sizes = [D] + [width] * DEPTH + [D]
    weights, biases, activations, params, layers = [], [], [], [], []
    for layer, (fan_in, out) in enumerate(zip(sizes[:-1], sizes[1:])):
        w = torch.randn(out, fan_in, generator=gen, dtype=torch.float64) / math.sqrt(fan_in)
        b = 0.1 * torch.randn(out, generator=gen, dtype=torch.float64)
        code, p0, p1 = SOFTPLUS if layer < len(sizes) - 2 else IDENTITY
        weights.append(w.to(DEVICE, dtype))
        biases.append(b.to(DEVICE, dtype))
        activations.append(code)
        params += [p0, p1]
        linear = torch.nn.Linear(fan_in, out).to(DEVICE, dtype)
        with torch.no_grad():
            linear.weight.copy_(weights[-1])
            linear.bias.copy_(biases[-1])
        layers.append(linear)
        if code == SOFTPLUS[0]:
            layers.append(torch.nn.Softplus(p0, p1))
    model = torch.nn.Sequential(*layers).requires_grad_(False)
    return (weights, biases, activations, params, []), model


def useful_flops(width, k, n):
    sizes = [D] + [width] * DEPTH + [D]
    return 2 * (1 + k) * n * sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))


def tangents_of(mode):
    return {"jacobian": D, "divergence": D, "hutchinson": 1, "jvp": 1}[mode]


# ---- methods: each maps (x, extra) -> the mode's output ---------------------------

def from_jacobian(mode, jac, extra):
    if mode == "jacobian":
        return jac
    if mode == "divergence":
        return jac.diagonal(dim1=-2, dim2=-1).sum(-1)
    if mode == "hutchinson":
        e = extra[:, 0]
        return torch.einsum("ni,nij,nj->n", e, jac, e)
    return torch.einsum("nij,nkj->nki", jac, extra)


def fused_method(mode, mlp):
    op = getattr(torch.ops.torchjac, f"mlp_{mode}")

    def run(x, extra):
        args = (x, x.new_zeros(x.shape[0], 0), *mlp) + ((extra,) if mode in ("hutchinson", "jvp") else ())
        return op(*args)  # (y, out, states): all count as outputs
    return run


def main_output(result):
    return result[1] if isinstance(result, tuple) else result


def reference_method(mode, mlp):
    def run(x, extra):
        tangents = extra if mode in ("hutchinson", "jvp") else None
        return torch.ops.torchjac.mlp_reference_forward(mode, x, x.new_zeros(x.shape[0], 0), *mlp, tangents)
    return run


def baseline_methods(mode, model):
    from torch.func import jacfwd, jacrev, jvp, vmap

    def vmap_jacfwd(x, extra):
        return from_jacobian(mode, vmap(jacfwd(model))(x), extra)

    def vmap_jacrev(x, extra):
        return from_jacobian(mode, vmap(jacrev(model))(x), extra)

    def vmap_jvp(x, extra):
        # extra: (N, k, 3); one jvp per tangent
        jv = vmap(lambda p, vs: vmap(lambda v: jvp(model, (p,), (v,))[1])(vs))(x, extra)
        return jv if mode == "jvp" else (jv * extra).sum(-1).mean(-1)

    def autograd(x, extra):
        if mode == "jvp":
            import torch.autograd.forward_ad as fwAD
            outs = []
            for s in range(extra.shape[1]):
                with fwAD.dual_level():
                    y = model(fwAD.make_dual(x, extra[:, s]))
                    outs.append(fwAD.unpack_dual(y).tangent)
            return torch.stack(outs, 1)
        with torch.enable_grad():
            xg = x.detach().requires_grad_()
            y = model(xg)
            if mode == "hutchinson":
                e = extra[:, 0]
                (vjp,) = torch.autograd.grad(y, xg, grad_outputs=e)
                return (vjp * e).sum(-1)
            rows = [torch.autograd.grad(y[:, i].sum(), xg, retain_graph=i + 1 < D)[0] for i in range(D)]
        return from_jacobian(mode, torch.stack(rows, 1), extra)

    methods = {"vmap(jacfwd)": vmap_jacfwd, "vmap(jacrev)": vmap_jacrev, "autograd": autograd}
    if mode in ("hutchinson", "jvp"):
        methods = {"vmap(jvp)": vmap_jvp, **methods}
    return methods


def oracle(mode, model, x, extra):
    from torch.func import jacrev, vmap
    model64 = _double(model)
    jac = vmap(jacrev(model64))(x.double())
    return from_jacobian(mode, jac, None if extra is None else extra.double())


_double_cache = {}


def _double(model):
    key = id(model)
    if key not in _double_cache:
        import copy
        _double_cache[key] = copy.deepcopy(model).double()
    return _double_cache[key]


# ---- measurement ----------------------------------------------------------------

class Skip(Exception):
    pass


def call_checked(fn, x, extra):
    """Runs fn, turning OOM into Skip and noting whether the fused op fell back to the reference path.

    The glue's fallback warning reaches C++ stderr rather than Python's warnings
    module for ops called through torch.ops (pytorch/pytorch#193451), so file
    descriptor 2 is read as well.
    """
    prev = torch.is_warn_always_enabled()
    torch.set_warn_always(True)
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with tempfile.TemporaryFile() as tmp, warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            os.dup2(tmp.fileno(), 2)
            try:
                out = fn(x, extra)
                torch.cuda.synchronize()
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace") + "".join(str(w.message) for w in caught)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        raise Skip("out of memory")
    finally:
        os.close(saved)
        torch.set_warn_always(prev)
    return out, "reference path" in text


def check(mode, model, fn, x, extra):
    out, fell_back = call_checked(fn, x, extra)
    out = main_output(out)
    n = x.shape[0]
    ends = [slice(0, min(CHECK_POINTS, n)), slice(max(n - CHECK_POINTS, 0), n)]
    err = 0.0
    for rows in ends:
        expected = oracle(mode, model, x[rows], None if extra is None else extra[rows])
        got = out[rows].double()
        scale = expected.abs().max().clamp_min(1e-30)
        err = max(err, ((got - expected).abs().max() / scale).item())
    del out
    return err, fell_back


def time_method(fn, x, extra, target_s, max_reps):
    call_checked(fn, x, extra)  # warm-up (and compilation)
    times = []
    while len(times) < max_reps and (sum(times) < target_s or len(times) < 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(x, extra)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if times[0] > target_s:  # one slow call is enough
            break
    return statistics.median(times), len(times)


def memory_of(fn, x, extra):
    """Peak bytes during one call, and the extra bytes beyond what was allocated before plus the outputs."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn(x, extra)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    outputs = sum(t.numel() * t.element_size() for t in (out if isinstance(out, tuple) else (out,)))
    del out
    return peak, max(peak - before - outputs, 0)


def measure(name, mode, model, width, fn, x, extra, args, env):
    precision = torch.get_float32_matmul_precision()
    row = {"method": name, "mode": mode, "width": width, "points": x.shape[0], "precision": precision}
    try:
        err, fell_back = check(mode, model, fn, x, extra)
        row.update(max_rel_err=err, fell_back=fell_back)
        if not err <= PRECISION_TOL[precision]:
            row["status"] = f"WRONG (relative error {err:.2e} > {PRECISION_TOL[precision]})"
            return row
        seconds, reps = time_method(fn, x, extra, args.target_seconds, args.max_reps)
        peak, extra_bytes = memory_of(fn, x, extra)
    except Skip as e:
        row["status"] = str(e)
        return row
    except Exception as e:  # a baseline that cannot run this size or mode
        torch.cuda.empty_cache()
        row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        return row
    tflops = useful_flops(width, tangents_of(mode), x.shape[0]) / seconds / 1e12
    row.update(status="ok", seconds=seconds, reps=reps, tflops=tflops,
               fraction_of_peak=tflops / env["fp32_peak_tflops"], peak_bytes=peak, extra_bytes=extra_bytes)
    return row


def inputs(mode, n, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(n, D, device=DEVICE, generator=gen)
    extra = None
    if mode in ("hutchinson", "jvp"):
        extra = torch.randn(n, 1, D, device=DEVICE, generator=gen)
    return x, extra


def gib(b):
    return f"{b / 2**30:7.2f}"


def print_rows(rows):
    fused = next((r for r in rows if r["method"] == "fused" and r.get("status") == "ok"), None)
    for r in rows:
        if r.get("status") != "ok":
            log(f"    {r['method']:<22} {r.get('status')}")
            continue
        speedup = r["seconds"] / fused["seconds"] if fused else float("nan")
        ratio = "" if r["method"] == "fused" else f"speed-up of fused {speedup:7.2f}x"
        log(f"    {r['method']:<22} {r['seconds'] * 1e3:10.2f} ms  {r['tflops']:6.2f} TFLOP/s "
            f"({100 * r['fraction_of_peak']:5.1f}% of peak)  peak {gib(r['peak_bytes'])} GiB  "
            f"extra {gib(r['extra_bytes'])} GiB  err {r['max_rel_err']:.1e}  {ratio}"
            + ("  [FELL BACK to reference]" if r.get("fell_back") else ""))


def run_config(mode, width, n, args, env):
    mlp, model = make_model(width)
    x, extra = inputs(mode, n)
    log(f"  {mode:<10} width {width:<4} points {n:>11,}  precision {torch.get_float32_matmul_precision():<8} "
        f"({useful_flops(width, tangents_of(mode), n) / 1e12:.3f} useful TFLOP per call)")
    rows = [measure("fused", mode, model, width, fused_method(mode, mlp), x, extra, args, env)]
    if not args.fused_only:
        rows.append(measure("reference", mode, model, width, reference_method(mode, mlp), x, extra, args, env))
        baselines = baseline_methods(mode, model)
        base_rows = [measure(name, mode, model, width, fn, x, extra, args, env) for name, fn in baselines.items()]
        rows += base_rows
        ok = [r for r in base_rows if r.get("status") == "ok"]
        if args.compile and ok:
            best = min(ok, key=lambda r: r["seconds"])["method"]
            compiled = torch.compile(baselines[best], dynamic=False)
            rows.append(measure(f"compile({best})", mode, model, width, compiled, x, extra, args, env))
            torch._dynamo.reset()
    print_rows(rows)
    del x, extra
    torch.cuda.empty_cache()
    return rows


def single_huge_call(mode, n, args, env):
    """One fused call on n points: time, memory, and the last points checked."""
    mlp, model = make_model(128)
    try:
        x, extra = inputs(mode, n)
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        log(f"  {mode:<10} {n:,} points: inputs do not fit")
        return {"method": "fused", "mode": mode, "width": 128, "points": n, "status": "out of memory"}
    log(f"  {mode:<10} width 128  points {n:>11,}")
    row = measure("fused", mode, model, 128, fused_method(mode, mlp), x, extra,
                  argparse.Namespace(**{**vars(args), "max_reps": 1}), env)
    print_rows([row])
    del x, extra
    torch.cuda.empty_cache()
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/gpu", help="directory for results.json and results.txt")
    parser.add_argument("--points", type=int, nargs="+", default=[1_000_000, 16_000_000])
    parser.add_argument("--widths", type=int, nargs="+", default=[128, 64, 256])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--huge", type=int, default=100_000_000, help="points of the single large call (0: skip)")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile")
    parser.add_argument("--fused-only", action="store_true", help="time only the fused kernels")
    parser.add_argument("--quick", action="store_true", help="100k points, width 128, no compile, no huge call")
    parser.add_argument("--target-seconds", type=float, default=1.0, help="time each method for about this long")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument("--precisions", nargs="+", default=["highest", "high", "medium"], choices=list(PRECISION_TOL),
                        help="float32 matmul precisions (torch.set_float32_matmul_precision) to run every row at")
    args = parser.parse_args()
    if args.quick:
        args.points, args.widths, args.compile, args.huge = [100_000], [128], False, 0

    if not torch.cuda.is_available():
        print(f"bench_gpu_forward: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              "this benchmark measures the fused CUDA kernels and needs an NVIDIA GPU.", file=sys.stderr)
        return 1
    try:
        import torchjac  # noqa: F401  (loads the ops and the CUDA kernels)
    except Exception as e:
        print(f"bench_gpu_forward: cannot import torchjac ({e}); build it with `pip install --no-build-isolation -e .`",
              file=sys.stderr)
        return 1
    if not torch._C._dispatch_has_kernel_for_dispatch_key("torchjac::mlp_jacobian", "CUDA"):
        print("bench_gpu_forward: torchjac was built without its CUDA kernels (no CUDA kernel for "
              "torchjac::mlp_jacobian); rebuild with TORCHJAC_CUDA=1.", file=sys.stderr)
        return 1

    env = environment()
    os.makedirs(args.out, exist_ok=True)
    log("torchjac GPU forward benchmark")
    for key, value in env.items():
        log(f"  {key}: {value}")
    log(f"  FLOP/s below use the FP32 peak {env['fp32_peak_tflops']:.1f} TFLOP/s ({env['fp32_peak_source']})")
    started = time.time()
    results = []
    user_precision = torch.get_float32_matmul_precision()
    for precision in args.precisions:
        torch.set_float32_matmul_precision(precision)
        for n in args.points:
            for width in args.widths:
                for mode in args.modes:
                    results += run_config(mode, width, n, args, env)
    torch.set_float32_matmul_precision(user_precision)
    huge = []
    if args.huge:
        log(f"single call on {args.huge:,} points")
        huge = [single_huge_call(mode, args.huge, args, env) for mode in args.modes]
    log(f"total {time.time() - started:.0f} s")

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "results": results, "huge_call": huge}, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write("\n".join(log.lines) + "\n")
    print(f"wrote {args.out}/results.json and {args.out}/results.txt")
    wrong = [r for r in results + huge if str(r.get("status", "")).startswith("WRONG") and r["method"] == "fused"]
    return 2 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
