"""Side by side in one process: torchjac's call with the recognition of the user's module kept between calls
(torchjac/recipe_cache.py), and the same call recognizing the module again with torch.fx, as every call did
before. Also the fingerprint's own cost per call. Float32, best of N interleaved runs, ms; the derivatives and
training gradients are checked against the float64 oracle first (bench_models.py's checks).

    python bench/bench_recognition.py [--threads 2] [--repeats 7] [--rows neus igr ffjord hyper_cnf]
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
import torchjac  # noqa: E402
from torchjac import recipe_cache, spec  # noqa: E402
from bench_models import ROWS, build, check_derivatives, check_training, make_batch, step  # noqa: E402


def seconds(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=["neus", "igr", "ffjord", "hyper_cnf"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, float32, best of {args.repeats} interleaved runs, ms")
    print(f"{'row':10s} {'what':16s} {'kept':>8s} {'traced':>8s} {'ratio':>6s}   fingerprint")
    traces = [0]  # recognitions by torch.fx
    recognize = spec.recognize

    def counted(*a, **k):
        traces[0] += 1
        return recognize(*a, **k)
    spec.recognize = counted
    for name in args.rows:
        row = ROWS[name]
        check_derivatives(row, 64, build(row), make_batch(row, 64))
        check_training(row)
        f, b = build(row), make_batch(row, row.points)
        for gname, group in row.groups.items():
            call = lambda: step(group, group.methods["torchjac"], f, b)  # noqa: E731

            def traced():
                recipe_cache.clear()
                call()
            call()
            kept, again, kept_traces = float("inf"), float("inf"), 0
            for _ in range(args.repeats):
                before = traces[0]
                kept = min(kept, seconds(call))
                kept_traces += traces[0] - before
                again = min(again, seconds(traced))
            if kept_traces:
                raise SystemExit(f"{name} / {gname}: {kept_traces} recognitions in the calls that should keep it")
            fp = min(seconds(lambda: [recipe_cache.fingerprint(m, key) for m, kept_keys in recipe_cache._kept.items()
                                      for key in kept_keys]) for _ in range(20))
            print(f"{name:10s} {gname:16s} {kept * 1e3:8.1f} {again * 1e3:8.1f} {again / kept:5.2f}x   "
                  f"{fp * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
