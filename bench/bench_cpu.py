"""CPU benchmark: torchjac against the ways users compute per-point Jacobians today.

For each model (3 -> [width] * depth -> 3, Softplus, float32) on 65,536 points it
checks every method against a float64 oracle, then times

  jacobian:  torchjac.jacobian, the autograd.grad loop per output component,
             vmap(jacrev), vmap(jacfwd), autograd.functional.jacobian(vectorize=True)
             with the batch-sum trick, and torch.compile of vmap(jacrev)/vmap(jacfwd)
             (headline model only, --compile);
  training:  one step of ||J - I||^2 and its backward, torchjac against the
             create_graph autograd loop and vmap(jacrev).

It prints a table with ratios against the fastest baseline of the same run,
achieved GFLOP/s (the tangent method's useful FLOPs, the same count for every
method) against a float32 GEMM measured in the same run, and the peak RSS
increase of each method, measured in a fresh subprocess. Results go to JSON.

    python bench/bench_cpu.py [--points 65536] [--threads 2] [--out bench/out/cpu.json]
"""
import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch.func import jacfwd, jacrev, vmap

import torchjac

D = 3
HEADLINE = (128, 4)


def make_model(width, depth, dtype=torch.float32):
    torch.manual_seed(0)
    return torchjac.PointMLP(D, [width] * depth, D, activation="softplus").to(dtype)


# ---- the methods: each returns J of shape (P, 3, 3)

def torchjac_jacobian(f, x):
    return torchjac.jacobian(f, x)


def autograd_loop(f, x, create_graph=False):
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
                for i in range(y.shape[-1])]
    return torch.stack(rows, 1)


def vmap_jacrev(f, x):
    return vmap(jacrev(f))(x)


def vmap_jacfwd(f, x):
    return vmap(jacfwd(f))(x)


def functional_jacobian(f, x):
    # The batch-sum trick: d sum_p f(x_p) / d x is (3, P, 3) because points do not interact.
    jac = torch.autograd.functional.jacobian(lambda x: f(x).sum(0), x, vectorize=True)
    return jac.permute(1, 0, 2)


JACOBIAN_METHODS = {
    "torchjac": torchjac_jacobian,
    "autograd_loop": autograd_loop,
    "vmap_jacrev": vmap_jacrev,
    "vmap_jacfwd": vmap_jacfwd,
    "functional_jacobian": functional_jacobian,
}


def train_torchjac(f, x):
    jac = torchjac.jacobian(f, x)
    loss = ((jac - torch.eye(D, dtype=x.dtype)) ** 2).sum()
    loss.backward()
    return loss


def train_autograd(f, x):
    jac = autograd_loop(f, x, create_graph=True)
    loss = ((jac - torch.eye(D, dtype=x.dtype)) ** 2).sum()
    loss.backward()
    return loss


def train_vmap_jacrev(f, x):
    jac = vmap(jacrev(f))(x)
    loss = ((jac - torch.eye(D, dtype=x.dtype)) ** 2).sum()
    loss.backward()
    return loss


TRAIN_METHODS = {"torchjac": train_torchjac, "autograd_create_graph": train_autograd,
                 "vmap_jacrev": train_vmap_jacrev}


def tangent_flops(width, depth, points, k=D):
    """Multiply-adds x2 of carrying [h; t_1..t_k] through the layers: the work every method must do."""
    sizes = [D] + [width] * depth + [D]
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return 2 * points * (1 + k) * macs


def gemm_gflops():
    """The machine's practical fp32 peak: the best of several large square GEMMs."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return 2 * 2048 ** 3 / timeit(lambda: torch.mm(a, b), 10) / 1e9


def timeit(fn, repeats):
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def check(name, jac, reference):
    err = ((jac.double() - reference).abs().max() / reference.abs().max()).item()
    if not err < 1e-4:
        raise SystemExit(f"{name}: relative error {err:.2e} against the float64 oracle; not timing a wrong answer")
    return err


def peak_rss_mb(kind, method, width, depth, points, threads):
    """Peak RSS increase of one call, in a fresh process so earlier runs do not hide it."""
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            f"import bench_cpu as b; b.measure_rss({kind!r}, {method!r}, {width}, {depth}, {points}, {threads})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def _status_kb(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure_rss(kind, method, width, depth, points, threads):
    """Prints the peak RSS above the RSS before the call, in MB (Linux: resets VmHWM first)."""
    torch.set_num_threads(threads)
    f = make_model(width, depth)
    x = torch.randn(points, D)
    # Warm up on a tiny input so one-time allocations are not counted.
    fns = JACOBIAN_METHODS if kind == "jacobian" else TRAIN_METHODS
    fns[method](f, x[:64].clone().requires_grad_(kind == "train"))
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # resets the peak RSS (VmHWM) to the current RSS
    before = _status_kb("VmRSS")
    fns[method](f, x.requires_grad_(kind == "train"))
    print((_status_kb("VmHWM") - before) / 1024)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=65536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--depths", type=int, nargs="+", default=[4, 8])
    p.add_argument("--no-compile", dest="compile", action="store_false", help="skip torch.compile baselines")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocesses")
    p.add_argument("--out", default="bench/out/cpu.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    peak = gemm_gflops()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"{args.points} points, float32; measured fp32 GEMM: {peak:.1f} GFLOP/s")
    results = {"torch": torch.__version__, "threads": args.threads, "points": args.points,
               "gemm_gflops": peak, "models": []}
    for depth in args.depths:
        for width in args.widths:
            f, f64 = make_model(width, depth), make_model(width, depth, torch.float64)
            x = torch.randn(args.points, D)
            reference = vmap(jacrev(f64))(x.double()).detach()
            headline = (width, depth) == HEADLINE
            methods = dict(JACOBIAN_METHODS)
            if headline and args.compile:
                methods["compile(vmap_jacrev)"] = torch.compile(vmap(jacrev(f)))
                methods["compile(vmap_jacfwd)"] = torch.compile(vmap(jacfwd(f)))
            flops = tangent_flops(width, depth, args.points)
            row = {"width": width, "depth": depth, "jacobian": {}, "train": {}}
            with torch.no_grad():
                for name, fn in methods.items():
                    call = (lambda fn=fn: fn(x)) if name.startswith("compile") else (lambda fn=fn: fn(f, x))
                    err = check(name, call(), reference)
                    t = timeit(call, args.repeats)
                    row["jacobian"][name] = {"seconds": t, "rel_err": err, "gflops": flops / t / 1e9}
            for name, fn in TRAIN_METHODS.items():
                xr = x.clone().requires_grad_()
                t = timeit(lambda: (f.zero_grad(), fn(f, xr)), args.repeats)
                row["train"][name] = {"seconds": t}
            if args.memory and headline:
                for kind, group in (("jacobian", JACOBIAN_METHODS), ("train", TRAIN_METHODS)):
                    for name in group:
                        row[kind][name]["peak_rss_mb"] = peak_rss_mb(kind, name, width, depth, args.points,
                                                                     args.threads)
            results["models"].append(row)
            report(row, peak)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}")


def report(row, peak):
    print(f"\n3 -> [{row['width']}] x {row['depth']} -> 3")
    for kind in ("jacobian", "train"):
        entries = row[kind]
        fastest = min(v["seconds"] for k, v in entries.items() if k != "torchjac")
        print(f"  {kind:<8} {'method':<24} {'ms':>9} {'speedup':>9} {'GFLOP/s':>9} {'of GEMM':>8} {'peak MB':>8}")
        for name, v in entries.items():
            gflops = v.get("gflops")
            rate = f"{gflops:9.1f} {100 * gflops / peak:7.0f}%" if gflops else f"{'':9} {'':8}"
            mem = f"{v['peak_rss_mb']:8.0f}" if "peak_rss_mb" in v else ""
            speedup = fastest / v["seconds"]
            print(f"  {'':<8} {name:<24} {1e3 * v['seconds']:9.1f} {speedup:8.2f}x {rate} {mem}")
        v = entries["torchjac"]
        print(f"  {'':<8} torchjac vs fastest baseline: {fastest / v['seconds']:.2f}x")


if __name__ == "__main__":
    main()
