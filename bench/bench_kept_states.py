"""Side by side in one process: the reverse mode's training step with what its forward keeps (each layer's
pre-activation and the cotangent rows it carried back: what torchjac.jacobian does under autograd), with the
pre-activations kept alone (the backward carrying the cotangent rows back again), with the backward recomputing
the forward, and the users' create_graph step. Float32, best of 5 interleaved runs; gradients are checked in bench_models.py.

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
from torchjac import api, reference  # noqa: E402
from bench_models import (autograd_jacobian_loop, autograd_sdf, deformation_mlp, eikonal,  # noqa: E402
                          jacobian_penalty, sdf_mlp)
import zoo  # noqa: E402


def recomputing(self, mode, x, *extra):
    """_Fused.op with keep_states=False: the backward recomputes the forward."""
    y, out, _ = getattr(torch.ops.torchjac, f"mlp_{mode}")(x, self.cond, *self.spec.op_args(), *extra, False)
    return y, out


def _z_only(mode, n_points, weights):
    """reference.kept_shapes without the reverse mode's cotangent rows: its backward carries them back again."""
    return _ALL_KEPT(mode, n_points, weights)[:len(weights)]


_ALL_KEPT = reference.kept_shapes


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
    keeping = api._Fused.op
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
        methods = {"kept states": (keeping, _ALL_KEPT), "kept z only": (keeping, _z_only),
                   "recomputed": (recomputing, _ALL_KEPT), "create_graph": (None, _ALL_KEPT)}
        best = dict.fromkeys(methods, float("inf"))
        for _ in range(5):
            for method, (call, kept_shapes) in methods.items():
                api._Fused.op, reference.kept_shapes = call or keeping, kept_shapes
                start = time.perf_counter()
                (users if call is None else ours)()
                best[method] = min(best[method], time.perf_counter() - start)
        api._Fused.op, reference.kept_shapes = keeping, _ALL_KEPT
        print(f"{title}\n  " + "  ".join(f"{m} {t * 1e3:.1f}" for m, t in best.items())
              + "  | create_graph / " + ", ".join(f"{m} {best['create_graph'] / best[m]:.2f}x"
                                                  for m in methods if m != "create_graph"))


if __name__ == "__main__":
    main()
