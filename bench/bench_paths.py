"""CPU benchmark of the generic path and of fx-recognized modules.

1. Generic path: a residual block with LayerNorm (which no fused kernel covers), 3 -> 3, float32,
   on 65,536 points; torchjac against vmap(jacrev), vmap(jacfwd) and the autograd loop, values
   checked against a float64 oracle first.
2. Fused path on a recognized module: a user-written module with the same layers and weights as a
   PointMLP (3 -> [128] x 4 -> 3, Softplus); torchjac on each, the ratio should be near 1.

    python bench/bench_paths.py [--points 65536] [--threads 2] [--out bench/out/paths.json]
"""
import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacfwd, jacrev, vmap

import torchjac

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu import autograd_loop, timeit  # noqa: E402


class ResidualBlock(nn.Module):
    def __init__(self, d=3, width=128):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2, self.fc3 = nn.Linear(d, width), nn.Linear(width, width), nn.Linear(width, d)

    def forward(self, x):
        return x + self.fc3(F.gelu(self.fc2(F.gelu(self.fc1(self.norm(x))))))


class UserMLP(nn.Module):
    """The PointMLP's network, written as users write it."""

    def __init__(self, point_mlp):
        super().__init__()
        self.layers = nn.ModuleList(point_mlp.layers)

    def forward(self, x):
        h = x
        for layer in self.layers[:-1]:
            h = F.softplus(layer(h))
        return self.layers[-1](h)


def check(name, jac, reference):
    err = ((jac.double() - reference).abs().max() / reference.abs().max()).item()
    if not err < 1e-4:
        raise SystemExit(f"{name}: relative error {err:.2e}; not timing a wrong answer")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--points", type=int, default=65536)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/out/paths.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.points, 3)
    results = {"torch": torch.__version__, "threads": args.threads, "points": args.points}

    block = ResidualBlock()
    block64 = ResidualBlock().double()
    block64.load_state_dict(block.state_dict())
    reference = vmap(jacrev(block64))(x.double()).detach()
    methods = {"torchjac (generic)": lambda: torchjac.jacobian(block, x),
               "vmap_jacrev": lambda: vmap(jacrev(block))(x),
               "vmap_jacfwd": lambda: vmap(jacfwd(block))(x),
               "autograd_loop": lambda: autograd_loop(block, x)}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.points} points, float32")
    print(f"\n1. generic path: {torchjac.explain(block)}")
    timings = {}
    with torch.no_grad():
        for name, fn in methods.items():
            check(name, fn(), reference)
            timings[name] = timeit(fn, args.repeats)
    fastest = min(t for name, t in timings.items() if name != "torchjac (generic)")
    for name, t in timings.items():
        print(f"   {name:<22} {1e3 * t:8.1f} ms   {fastest / t:5.2f}x of the fastest baseline")
    results["generic"] = timings

    mlp = torchjac.PointMLP(3, [128] * 4, 3, activation="softplus")
    user = UserMLP(mlp)
    print(f"\n2. recognized module: {torchjac.explain(user)}")
    with torch.no_grad():
        check("recognized", torchjac.jacobian(user, x), torchjac.jacobian(mlp, x).double())
        t_mlp = timeit(lambda: torchjac.jacobian(mlp, x), args.repeats)
        t_user = timeit(lambda: torchjac.jacobian(user, x), args.repeats)
    print(f"   PointMLP          {1e3 * t_mlp:8.1f} ms")
    print(f"   user module       {1e3 * t_user:8.1f} ms   ratio {t_user / t_mlp:.3f}")
    results["recognized"] = {"point_mlp": t_mlp, "user_module": t_user}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
