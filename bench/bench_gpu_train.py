"""GPU benchmark of training through torchjac's fused CUDA kernels (forward and backward) against autograd.

Workloads, each one training step (loss, then backward into the parameters):
  jacobian_identity  sum ||J - I||^2 over points of a 3 -> [width] * depth -> 3 Softplus PointMLP
  cnf_exact          CNF: 0.5 ||f(x, t)||^2 - div f, exact divergence, a time t per batch as cond
  cnf_hutchinson     the same with a one-sample Rademacher Hutchinson estimate of the divergence
  eikonal            (||grad f|| - 1)^2 + 0.1 |f| of a 3 -> [256] * depth -> 1 Softplus(beta=100) SDF
Methods, all measured in the same run:
  torchjac           torchjac.jacobian / torchjac.divergence on the PointMLP (fused forward + backward kernels)
  compile(torchjac)  torch.compile(fullgraph=True) of the same loss
  autograd           the create_graph loop users write today: one autograd.grad per output,
                     one vector-Jacobian product for Hutchinson
  compile(autograd)  torch.compile of that loss (graph breaks allowed), where it compiles

Every method's loss and parameter gradients are checked against a float64 autograd
oracle on a small batch before anything is timed; a method that fails the check is
reported and not timed. Reported per method: median step time (CUDA events, after
warm-up), the speed-up of torchjac over it, peak memory of a step
(torch.cuda.max_memory_allocated) and the extra memory beyond the model and inputs,
and the largest number of points it can train in one step (doubling, then
bisection to within 5%, out-of-memory errors caught, bounded in time).
The headline target: 1M points, width 128, depth 4.

    python bench/bench_gpu_train.py --out bench/out/gpu_train [--quick] [--no-search] [--no-compile]

Writes results.json and results.txt (everything printed) to --out, with the device
name, driver, torch and CUDA versions and the git commit. Exits with 1 and a message
without CUDA or without torchjac's CUDA kernels, and with 2 if torchjac fails its check.
Hutchinson noise comes from the global RNG in every method; the check seeds it before
each method and before the oracle, and torch._inductor.config.fallback_random makes
compiled code draw the same numbers as eager code.
"""
import argparse
import copy
import gc
import json
import math
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_forward import Tee, environment  # noqa: E402  (same device and git details as the forward benchmark)

DEVICE = "cuda"
BATCHES = 64            # points are (BATCHES, N / BATCHES, 3); CNF times are one per batch
CHECK_SHAPE = (4, 512)  # points of the correctness check
CHECK_TOL = 1e-3        # relative to the largest entry; a gate against wrong results, not a precision test
# The same gate per float32 matmul precision (TF32 and BF16 tensor cores for the fused kernels, and for cuBLAS in
# the baselines); the stated error bounds are tested in tests/test_cuda_precision.py.
PRECISION_TOL = {"highest": CHECK_TOL, "high": 3e-2, "medium": 1.5e-1}
SEARCH_PRECISION = 0.05

log = Tee()


# ---- workloads -----------------------------------------------------------------------

class Workload:
    def __init__(self, name, quantity, loss, d_out, width, activation, cond):
        self.name, self.quantity, self.loss = name, quantity, loss
        self.d_out, self.width, self.activation, self.cond = d_out, width, activation, cond

    def model(self, depth, dtype=torch.float32):
        import torchjac
        torch.manual_seed(0)
        return torchjac.PointMLP(3, [self.width] * depth, self.d_out, activation=self.activation,
                                 cond_features=1 if self.cond else 0).to(DEVICE, dtype)

    def inputs(self, n, batches=BATCHES, seed=0, dtype=torch.float32):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        per_batch = max(1, n // batches)
        x = torch.randn(batches, per_batch, 3, device=DEVICE, generator=gen, dtype=dtype)
        t = torch.rand(batches, 1, 1, device=DEVICE, generator=gen, dtype=dtype) if self.cond else None
        return x, t


def identity_loss(y, jac):
    eye = torch.eye(jac.shape[-1], device=jac.device, dtype=jac.dtype)
    return ((jac - eye) ** 2).sum((-2, -1)).mean()


def cnf_loss(y, div):
    return 0.5 * (y ** 2).sum(-1).mean() - div.mean()


def eikonal_loss(y, jac):
    return ((jac[..., 0, :].norm(dim=-1) - 1) ** 2).mean() + 0.1 * y.abs().mean()


def workloads(width):
    return {
        "jacobian_identity": Workload("jacobian_identity", "jacobian", identity_loss, 3, width, "softplus", False),
        "cnf_exact": Workload("cnf_exact", "divergence", cnf_loss, 3, width, "softplus", True),
        "cnf_hutchinson": Workload("cnf_hutchinson", "hutchinson", cnf_loss, 3, width, "softplus", True),
        "eikonal": Workload("eikonal", "jacobian", eikonal_loss, 1, 256, torch.nn.Softplus(beta=100), False),
    }


# ---- methods: each maps (f, x, t) -> (y, the workload's quantity) -----------------------

def torchjac_method(workload):
    import torchjac

    def run(f, x, t):
        if workload.quantity == "jacobian":
            return torchjac.jacobian(f, x, cond=t, return_output=True)
        estimator = "exact" if workload.quantity == "divergence" else "hutchinson"
        return torchjac.divergence(f, x, cond=t, estimator=estimator, return_output=True)
    return run


def autograd_method(workload):
    def run(f, x, t):
        x = x.detach().requires_grad_()
        y = f(x) if t is None else f(x, t)
        if workload.quantity == "hutchinson":
            # The same draw as torchjac's: float32 Rademacher noise of shape (..., samples, d_in) from the
            # global RNG (float32 also for the float64 oracle, so that it sees the same numbers).
            shape = (*x.shape[:-1], 1, x.shape[-1])
            e = (torch.randint(0, 2, shape, device=x.device, dtype=torch.float32) * 2 - 1)[..., 0, :].to(x.dtype)
            (vjp,) = torch.autograd.grad(y, x, grad_outputs=e, create_graph=True)
            return y, (vjp * e).sum(-1)
        rows = [torch.autograd.grad(y[..., i].sum(), x, create_graph=True)[0] for i in range(y.shape[-1])]
        if workload.quantity == "divergence":
            return y, sum(r[..., i] for i, r in enumerate(rows))
        return y, torch.stack(rows, -2)
    return run


def methods(workload, compile_methods):
    base = {"torchjac": torchjac_method(workload), "autograd": autograd_method(workload)}

    def loss_fn(method):
        return lambda f, x, t: workload.loss(*method(f, x, t))

    result = {name: loss_fn(m) for name, m in base.items()}
    if compile_methods:
        # Static shapes: each point count compiles once (the search resets dynamo before every trial).
        result["compile(torchjac)"] = torch.compile(loss_fn(base["torchjac"]), fullgraph=True, dynamic=False)
        result["compile(autograd)"] = torch.compile(loss_fn(base["autograd"]), dynamic=False)
    return result


# ---- measurement ------------------------------------------------------------------------

class OutOfMemory(Exception):
    pass


def is_oom(e):
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e)


def free_memory():
    gc.collect()
    torch.cuda.empty_cache()


def train_step(loss_fn, f, x, t):
    """One step: loss, backward into f's parameters. Returns the loss."""
    for p in f.parameters():
        p.grad = None
    loss = loss_fn(f, x, t)
    loss.backward()
    return loss.detach()


def checked_step(loss_fn, f, x, t):
    """train_step, turning OOM into OutOfMemory and noting whether torchjac fell back to the reference path.

    The glues' fallback warnings reach C++ stderr rather than Python's warnings module
    for ops called through torch.ops (pytorch/pytorch#193451), so descriptor 2 is read too.
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
                loss = train_step(loss_fn, f, x, t)
                torch.cuda.synchronize()
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
            tmp.seek(0)
            text = tmp.read().decode(errors="replace") + "".join(str(w.message) for w in caught)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        free_memory()
        raise OutOfMemory() from None
    finally:
        os.close(saved)
        torch.set_warn_always(prev)
    return loss, "reference path" in text


def max_rel_err(actual, expected):
    if expected.numel() == 0:
        return 0.0
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected.double()).abs().max() / scale).item()


def check(workload, name, loss_fn, depth):
    """Loss and parameter gradients on CHECK_SHAPE points against float64 autograd; returns (error, fell back)."""
    f = workload.model(depth)
    x, t = workload.inputs(math.prod(CHECK_SHAPE), batches=CHECK_SHAPE[0], seed=1)
    torch.manual_seed(123)
    loss, fell_back = checked_step(loss_fn, f, x, t)
    got = [loss] + grads_of(f)
    f64 = copy.deepcopy(f).double()
    torch.manual_seed(123)
    loss64 = train_step(methods_oracle(workload), f64, x.double(), None if t is None else t.double())
    expected = [loss64] + grads_of(f64)
    return max(max_rel_err(a, e) for a, e in zip(got, expected)), fell_back


def grads_of(f):
    """Parameter gradients; autograd leaves None where the loss does not depend on a parameter
    (the output bias does not change J)."""
    return [torch.zeros_like(p) if p.grad is None else p.grad for p in f.parameters()]


def methods_oracle(workload):
    method = autograd_method(workload)
    return lambda f, x, t: workload.loss(*method(f, x, t))


def time_steps(loss_fn, f, x, t, target_s, max_reps):
    checked_step(loss_fn, f, x, t)  # warm-up (and compilation)
    times = []
    while len(times) < max_reps and (sum(times) < target_s or len(times) < 3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        train_step(loss_fn, f, x, t)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
        if times[0] > target_s:
            break
    return statistics.median(times), len(times)


def step_memory(loss_fn, f, x, t):
    """Peak bytes during a step, and the extra beyond what was allocated before it (model, inputs)."""
    for p in f.parameters():
        p.grad = None
    free_memory()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    train_step(loss_fn, f, x, t)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    return peak, max(peak - before, 0)


def fits(workload, loss_fn, depth, n):
    """Whether one step on n points runs without running out of memory."""
    f = x = t = None
    torch._dynamo.reset()  # compiled methods compile each point count afresh
    try:
        f = workload.model(depth)
        x, t = workload.inputs(n)
        checked_step(loss_fn, f, x, t)
        return True
    except OutOfMemory:
        return False
    except RuntimeError as e:
        if is_oom(e):
            return False
        raise
    finally:
        del f, x, t
        free_memory()


def max_points(workload, loss_fn, depth, start, limit, budget_s):
    """The largest point count (a multiple of BATCHES) that trains in one step: doubling from `start`,
    then bisection to SEARCH_PRECISION; stops at `limit` points or after about budget_s seconds."""
    started = time.time()
    ok, failed, n = 0, None, start
    while time.time() - started < budget_s:
        if fits(workload, loss_fn, depth, n):
            ok = n
            if failed is None:
                if n >= limit:
                    return {"max_points": ok, "bound": "limit", "seconds": time.time() - started}
                n = min(2 * n, limit)
                continue
        else:
            failed = n
        if failed - ok <= max(SEARCH_PRECISION * ok, BATCHES):
            return {"max_points": ok, "bound": f"next failure {failed:,}", "seconds": time.time() - started}
        n = (ok + failed) // 2 // BATCHES * BATCHES
    return {"max_points": ok, "bound": "time" + ("" if failed is None else f", next failure {failed:,}"),
            "seconds": time.time() - started}


def time_and_memory(workload, loss_fn, n, depth, args):
    f = workload.model(depth)
    x, t = workload.inputs(n)
    seconds, reps = time_steps(loss_fn, f, x, t, args.target_seconds, args.max_reps)
    peak, extra = step_memory(loss_fn, f, x, t)
    return {"points": x.shape[0] * x.shape[1], "status": "ok", "seconds": seconds, "reps": reps,
            "peak_bytes": peak, "extra_bytes": extra}


def measure(workload, name, loss_fn, n, depth, args):
    precision = torch.get_float32_matmul_precision()
    row = {"workload": workload.name, "method": name, "points": n, "width": workload.width, "depth": depth,
           "precision": precision}
    try:
        err, fell_back = check(workload, name, loss_fn, depth)
        row.update(max_rel_err=err, fell_back=fell_back)
        if not err <= PRECISION_TOL[precision]:
            row["status"] = f"WRONG (relative error {err:.2e} > {PRECISION_TOL[precision]})"
            return row
        row.update(time_and_memory(workload, loss_fn, n, depth, args))
    except Exception as e:  # out of memory, or a baseline that cannot run this workload or does not compile
        if isinstance(e, OutOfMemory) or is_oom(e):
            row["status"] = "out of memory"
        else:
            row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    free_memory()
    if args.search and not str(row.get("status", "")).startswith(("WRONG", "failed")):
        row["search"] = max_points(workload, loss_fn, depth, args.search_start, args.search_limit, args.search_seconds)
        free_memory()
    return row


def gib(b):
    return f"{b / 2**30:7.2f}"


def print_rows(rows):
    ours = next((r for r in rows if r["method"] == "torchjac" and r.get("status") == "ok"), None)
    for r in rows:
        found = r.get("search")
        most = "" if found is None else f"  max points {found['max_points']:>13,} ({found['bound']})"
        if r.get("status") != "ok":
            log(f"    {r['method']:<18} {r.get('status')}{most}")
            continue
        ratios = ""
        if ours is not None and r is not ours:
            r["speedup_of_torchjac"] = r["seconds"] / ours["seconds"]
            r["extra_memory_over_torchjac"] = r["extra_bytes"] / max(ours["extra_bytes"], 1)
            ratios = (f"  torchjac: speed-up {r['speedup_of_torchjac']:6.2f}x, "
                      f"extra memory / torchjac's {r['extra_memory_over_torchjac']:6.2f}x")
            if found is not None and ours.get("search") and found["max_points"]:
                r["torchjac_max_points_over_this"] = ours["search"]["max_points"] / found["max_points"]
                ratios += f", max points of torchjac / this {r['torchjac_max_points_over_this']:6.2f}x"
        log(f"    {r['method']:<18} {r['seconds'] * 1e3:10.2f} ms/step  peak {gib(r['peak_bytes'])} GiB  "
            f"extra {gib(r['extra_bytes'])} GiB  err {r['max_rel_err']:.1e}{most}{ratios}"
            + ("  [FELL BACK to reference]" if r.get("fell_back") else ""))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench/out/gpu_train", help="directory for results.json and results.txt")
    parser.add_argument("--points", type=int, default=1_000_000)
    parser.add_argument("--width", type=int, default=128, help="hidden width (the eikonal SDF always has 256)")
    parser.add_argument("--depth", type=int, default=4, help="hidden layers")
    parser.add_argument("--workloads", nargs="+", default=list(workloads(128)), choices=list(workloads(128)))
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="skip the torch.compile methods")
    parser.add_argument("--no-search", dest="search", action="store_false", help="skip the largest-batch search")
    parser.add_argument("--search-start", type=int, default=1 << 20)
    parser.add_argument("--search-limit", type=int, default=1 << 30, help="largest point count tried")
    parser.add_argument("--search-seconds", type=float, default=120.0, help="time bound of each search")
    parser.add_argument("--quick", action="store_true", help="100k points, no compile, short searches")
    parser.add_argument("--target-seconds", type=float, default=1.0, help="time each method for about this long")
    parser.add_argument("--max-reps", type=int, default=20)
    parser.add_argument("--precisions", nargs="+", default=["highest"], choices=list(PRECISION_TOL),
                        help="float32 matmul precisions (torch.set_float32_matmul_precision) to run every workload at")
    args = parser.parse_args()
    if args.quick:
        args.points, args.compile, args.search_seconds, args.search_limit = 100_000, False, 20.0, 1 << 24

    if not torch.cuda.is_available():
        print(f"bench_gpu_train: no CUDA device (torch {torch.__version__}, built with CUDA {torch.version.cuda}); "
              "this benchmark trains through the fused CUDA kernels and needs an NVIDIA GPU.", file=sys.stderr)
        return 1
    try:
        import torchjac  # noqa: F401  (loads the ops and the CUDA kernels)
    except Exception as e:
        print(f"bench_gpu_train: cannot import torchjac ({e}); build it with `pip install --no-build-isolation -e .`",
              file=sys.stderr)
        return 1
    for op in ("mlp_jacobian", "mlp_jacobian_backward"):
        if not torch._C._dispatch_has_kernel_for_dispatch_key(f"torchjac::{op}", "CUDA"):
            print(f"bench_gpu_train: torchjac was built without its CUDA kernels (no CUDA kernel for "
                  f"torchjac::{op}); rebuild with TORCHJAC_CUDA=1.", file=sys.stderr)
            return 1
    torch._inductor.config.fallback_random = True  # compiled code draws the same noise as eager code

    env = environment()
    os.makedirs(args.out, exist_ok=True)
    log("torchjac GPU training benchmark (forward + backward of one step)")
    for key, value in env.items():
        log(f"  {key}: {value}")
    started = time.time()
    results = []
    user_precision = torch.get_float32_matmul_precision()
    for precision in args.precisions:
        torch.set_float32_matmul_precision(precision)
        for name in args.workloads:
            workload = workloads(args.width)[name]
            log(f"  {name:<18} width {workload.width} depth {args.depth} points {args.points:,} (float32, "
                f"precision {precision})")
            rows = []
            for method, loss_fn in methods(workload, args.compile).items():
                rows.append(measure(workload, method, loss_fn, args.points, args.depth, args))
                torch._dynamo.reset()
            print_rows(rows)
            results += rows
    torch.set_float32_matmul_precision(user_precision)
    log(f"total {time.time() - started:.0f} s")

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"environment": env, "args": vars(args), "results": results}, f, indent=1)
    with open(os.path.join(args.out, "results.txt"), "w") as f:
        f.write("\n".join(log.lines) + "\n")
    print(f"wrote {args.out}/results.json and {args.out}/results.txt")
    wrong = [r for r in results if r["method"].endswith("torchjac") and str(r.get("status", "")).startswith("WRONG")]
    return 2 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
