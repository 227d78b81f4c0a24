"""A Jacobian with more than 2^31 elements is indexed correctly (int64 offsets everywhere).

The smallest model that reaches that size: d_in = d_out = 16 and one hidden unit,
so J has 256 entries per point and 2^23 + 4096 points give 2.16e9 entries
(8.6 GB in float32; about 10 GB of memory in all). Points are drawn so that
each one's Jacobian differs. It computes J with torchjac on the whole input,
then checks points on both sides of the 2^31-entry boundary, the first and the
last points, and a random sample against the torch.func oracle run on those
points alone; the divergence and the jvp are checked the same way.

    python bench/check_large_jacobian.py [--device cpu|cuda] [--out FILE]

Too large for the test suite: run it by hand (about a minute on 2 CPU cores).
"""
import argparse
import json
import platform
import subprocess
import time

import torch
from torch.func import jacrev, vmap

import torchjac

D = 16
LIMIT = 2 ** 31


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default=None, help="write the result as JSON")
    args = parser.parse_args()
    device = torch.device(args.device)
    n_points = LIMIT // (D * D) + 4096
    torch.manual_seed(0)
    f = torchjac.PointMLP(D, [1], D, activation="tanh").to(device)
    x = torch.randn(n_points, D, device=device)

    start = time.perf_counter()
    with torch.no_grad():
        jac = torchjac.jacobian(f, x)
        div = torchjac.divergence(f, x)
        jvp = torchjac.jvp(f, x, x)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    assert jac.shape == (n_points, D, D) and jac.numel() > LIMIT, jac.shape

    boundary = LIMIT // (D * D)  # the first point whose entries start at or beyond 2^31
    picks = torch.cat([torch.arange(0, 4), torch.arange(boundary - 4, boundary + 4),
                       torch.arange(n_points - 4, n_points), torch.randint(0, n_points, (64,))]).to(device)
    jac_ref = vmap(jacrev(f))(x[picks])
    scale = jac_ref.abs().max().item()
    errors = {
        "jacobian": (jac[picks] - jac_ref).abs().max().item(),
        "divergence": (div[picks] - jac_ref.diagonal(0, -2, -1).sum(-1)).abs().max().item(),
        "jvp": (jvp[picks] - (jac_ref @ x[picks].unsqueeze(-1)).squeeze(-1)).abs().max().item(),
    }
    # The flat view: entry 2^31 + 5 is entry 5 of the first point past the boundary.
    flat = jac.view(-1)[LIMIT + 5].item()
    first_past = jac_ref[8].reshape(-1)[5].item()  # picks[8] is the point `boundary`
    errors["flat entry 2^31 + 5"] = abs(flat - first_past)
    ok = all(e <= 1e-5 * max(scale, 1.0) for e in errors.values())
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
        "points": n_points, "jacobian_entries": jac.numel(),
        "seconds_for_three_calls": round(seconds, 2), "max_errors": errors, "scale": scale, "ok": ok,
    }
    print(json.dumps(result, indent=2))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(result, fh, indent=2)
    if not ok:
        raise SystemExit("FAILED: an entry differs from the oracle beyond 1e-5 of scale")


if __name__ == "__main__":
    main()
