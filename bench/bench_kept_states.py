"""Side by side in one process: the reverse mode's training step with its forward's kept pre-activations
(what torchjac.jacobian does under autograd), with the backward recomputing them, and the users' create_graph
step. Float32, best of 5 interleaved runs; gradients are checked in bench_models.py.

    python bench/bench_kept_states.py [--threads 2] [--rows sdf igr deform]
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
from torchjac import api  # noqa: E402
from bench_models import (autograd_jacobian_loop, autograd_sdf, deformation_mlp, eikonal,  # noqa: E402
                          jacobian_penalty, sdf_mlp)
import zoo  # noqa: E402


def recomputing(self, mode, *extra):
    """_Fused.call with keep_states=False: the backward recomputes the forward."""
    y, out, _ = getattr(torch.ops.torchjac, f"mlp_{mode}")(*self.args(), *extra, False)
    return y, out


ROWS = {
    "sdf": ("SDF 3-256x4-1 Softplus(100), 16,384 points, eikonal step", sdf_mlp, 16384, "eikonal"),
    "igr": ("IGR 3-512x8-1 skip into 4, 4,096 points, eikonal step",
            lambda: zoo.IGRImplicitNet(dims=[512] * 8, skip_in=(4,)), 4096, "eikonal"),
    "deform": ("deformation 3-128x4-3 Softplus, 65,536 points, ||J - I||^2 step (forward mode: keeps none)",
               deformation_mlp, 65536, "penalty"),
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, best of 5 interleaved runs, ms")
    keeping = api._Fused.call
    for name in args.rows:
        title, build, points, loss = ROWS[name]
        torch.manual_seed(0)
        f, x = build(), torch.randn(points, 3)
        if loss == "eikonal":
            ours = lambda: eikonal(*torchjac.jacobian(f, x, return_output=True)).backward()  # noqa: E731
            users = lambda: eikonal(*autograd_sdf(f, x, True)).backward()  # noqa: E731
        else:
            ours = lambda: jacobian_penalty(torchjac.jacobian(f, x)).backward()  # noqa: E731
            users = lambda: jacobian_penalty(autograd_jacobian_loop(f, x, True)).backward()  # noqa: E731
        best = {"kept states": float("inf"), "recomputed": float("inf"), "create_graph": float("inf")}
        for _ in range(5):
            for method, call in (("kept states", keeping), ("recomputed", recomputing), ("create_graph", None)):
                api._Fused.call = call or keeping
                start = time.perf_counter()
                (users if call is None else ours)()
                best[method] = min(best[method], time.perf_counter() - start)
        api._Fused.call = keeping
        print(f"{title}\n  " + "  ".join(f"{m} {t * 1e3:.1f}" for m, t in best.items())
              + f"  | create_graph / kept {best['create_graph'] / best['kept states']:.2f}x,"
              f" create_graph / recomputed {best['create_graph'] / best['recomputed']:.2f}x")


if __name__ == "__main__":
    main()
