"""CPU benchmark on published model shapes: torchjac against the code users of these models run today.

Rows (float32, 2 threads by default; the models come from tests/zoo.py where it has them):

  deform    nn.Sequential 3-128x4-3 Softplus, 65,536 points: the per-point Jacobian against the
            autograd loop (one autograd.grad per output) and vmap(jacrev), and one training step of the
            Jacobian penalty mean ||J - I||^2 against the create_graph loop;

  sdf       nn.Sequential 3-256x4-1, Softplus(beta=100), 16,384 points
  igr       zoo.IGRImplicitNet 3-512x8-1, skip into layer 4, 4,096 points
  neus      zoo.NeuSSDFNetwork as published (positional encoding multires 6, 3-256x8-257, skip into layer 4,
            old weight_norm), 4,096 points: the sdf's gradient (torchjac.jacobian with outputs=slice(0, 1)
            against NeuS's own gradient(), autograd.grad of f(x)[:, :1]) and its eikonal step;
  deepsdf   zoo.DeepSDFDecoder as DeepSDF's experiments configure it (latent 256, 8 x 512, latent and xyz into
            layer 4, weight_norm, eval) with one shape code as cond, 4,096 points: the gradient w.r.t. xyz
            against autograd.grad (DeepSDF's normals) and an eikonal step against its create_graph version;
  siren     zoo.Siren 3-256x3-1 (its .net, since Siren.forward detaches the points), 16,384 points
            each: the gradient (torchjac.jacobian against autograd.grad of f(x).sum()) and one eikonal
            training step, loss = mean((|grad| - 1)^2) + mean(|f(x)|), against its create_graph version;
  cnf       a CNF's dynamics forward(x, t) = net(cat([x, t.expand(x.shape[0], 1)], -1)), 3+1-256x3-3 Tanh,
            16,384 points; the exact divergence against FFJORD's divergence_bf (one autograd.grad per
            dimension) and the Hutchinson estimate (one shared Rademacher draw) against FFJORD's
            e^T (dy/dx) e, then one training step of each, loss = mean(y^2) + mean(div);
  cnf_ffjord the same dynamics with FFJORD's own idiom cat([ones_like(x[:, :1]) * t, x], 1);
  ffjord    zoo.ODEnet at FFJORD's MINIBOONE size (d = 43, concatsquash 860-860, softplus), forward(t, y) with
            one t, 1,024 points: the exact and Hutchinson divergences and their training steps against FFJORD's
            divergence_bf and divergence_approx (torchjac given x_arg="y");
  hyper_cnf zoo.HyperCNF at torchdiffeq's cnf example size (2-d, width 64, hypernetwork 1-32-32-448, one t,
            512 samples), forward(t, z): the same four groups (torchjac given x_arg="z"); torchdiffeq's
            trace_df_dz is the divergence_bf loop;
  pointnet  zoo.pointnet_shared_mlp((64, 128, 256)) in eval mode on (4, 3, 1024): the per-point
            Jacobian against vmap(jacfwd), one torch.func.jvp per input dim and the autograd loop;
  pinn      nn.Sequential 3-128x4-1 Tanh, 16,384 points: the exact Laplacian and the Hessian against
            nested create_graph autograd (the gradient, then one autograd.grad per input dim) and
            vmap(torch.func.hessian), and one Poisson residual training step,
            loss = mean((laplacian - s(x))^2) + mean(u^2), against the nested create_graph version.

Every method's output is checked against vmap(jacrev) (vmap(hessian) for second order) of the float64 model,
and every training step's
parameter gradients against those of the create_graph baseline, in float64 on a small batch, before
anything is timed. Each row is timed twice, quiet and with another process keeping one core busy (as
on a shared machine); ratios are baseline time / torchjac time from the same run. The peak RSS increase
of each method is measured in a fresh subprocess (quiet). The table says which path explain() reports
for the model. A points sweep of the sdf row (time and peak memory per method) goes into the JSON and a
log-log plot next to it (matplotlib, imported only to plot).

    python bench/bench_models.py [--threads 2] [--rows sdf cnf ...] [--no-busy] [--no-memory]
                                 [--points-sweep 1024 4096 16384 65536] [--out bench/out/models.json]
    python bench/bench_models.py --quick   # tiny sizes, one repeat, no memory: about a minute
"""
import argparse
import contextlib
import dataclasses
import json
import os
import platform
import subprocess
import sys
from typing import Callable, Dict, NamedTuple, Optional

import torch
from torch import nn
from torch.func import hessian, jacfwd, jacrev, jvp, vmap

import torchjac

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from bench_cpu import _status_kb, check, gemm_gflops, timeit  # noqa: E402
import zoo  # noqa: E402
from ops_seen import ops_seen  # noqa: E402


# ---- the models, as users write them where the zoo has none

def sdf_mlp(width=256, depth=4, beta=100):
    layers = [nn.Linear(3, width), nn.Softplus(beta)]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Softplus(beta)]
    return nn.Sequential(*layers, nn.Linear(width, 1))


class ODEFunc(nn.Module):
    """A CNF's dynamics on 3-d points: the time concatenated to the points."""

    def __init__(self, d=3, width=256, depth=3, act=nn.Tanh):
        super().__init__()
        layers, c = [], d + 1
        for _ in range(depth):
            layers += [nn.Linear(c, width), act()]
            c = width
        self.net = nn.Sequential(*layers, nn.Linear(width, d))

    def forward(self, x, t):
        return self.net(torch.cat([x, t.expand(x.shape[0], 1)], -1))


class FFJORDODEFunc(ODEFunc):
    """The same, with the time column built as FFJORD's ConcatLinear builds it."""

    def forward(self, x, t):
        return self.net(torch.cat([torch.ones_like(x[:, :1]) * t, x], 1))


class Batch(NamedTuple):
    x: torch.Tensor
    cond: Optional[torch.Tensor] = None   # the CNF's time, one column
    noise: Optional[torch.Tensor] = None  # the Hutchinson estimator's Rademacher draw, shared by all methods


# ---- SDF rows: the gradient and the eikonal step

def autograd_sdf(f, x, create_graph=False):
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x)
        grad = torch.autograd.grad(y.sum(), x, create_graph=create_graph)[0]
    return y, grad[:, None, :]


def eikonal(y, jac):
    return ((jac.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()


# ---- CNF rows: FFJORD's divergence_bf and divergence_approx

def divergence_bf(f, b, create_graph=False):
    x = b.x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x, b.cond)
        div = sum(torch.autograd.grad(y[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0][:, i]
                  for i in range(x.shape[1]))
    return y, div


def divergence_approx(f, b, create_graph=False):
    x = b.x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x, b.cond)
        e_dydx = torch.autograd.grad(y, x, b.noise, create_graph=create_graph)[0]
    return y, (e_dydx * b.noise).sum(-1)


def cnf_loss(y, div):
    return (y ** 2).mean() + div.mean()


def hutchinson(J, b):
    return torch.einsum("pi,pij,pj->p", b.noise, J, b.noise)


# ---- PointNet row: per-point Jacobians of a channels-first (B, C, N) model

def pointwise(f):
    """f on one point (C,), as a batch of one (1, C, 1)."""
    return lambda p: f(p[None, :, None])[0, :, 0]


def per_point(jac, x):
    """(B * N, C_out, C_in) -> (B, N, C_out, C_in), torchjac's layout."""
    return jac.reshape(x.shape[0], x.shape[2], *jac.shape[1:])


def pointnet_vmap_jacfwd(f, b):
    return per_point(vmap(jacfwd(pointwise(f)))(b.x.movedim(1, -1).reshape(-1, b.x.shape[1])), b.x)


def pointnet_jvp_per_input(f, b):
    """Points do not interact, so one jvp with tangent e_j at every point gives column j of every J."""
    columns = []
    for j in range(b.x.shape[1]):
        tangent = torch.zeros_like(b.x)
        tangent[:, j] = 1
        columns.append(jvp(f, (b.x,), (tangent,))[1])
    return torch.stack(columns, -1).movedim(2, 1)   # (B, C_out, N, C_in) -> (B, N, C_out, C_in)


def pointnet_autograd_loop(f, b):
    x = b.x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, retain_graph=True)[0] for i in range(y.shape[1])]
    return torch.stack(rows, 1).permute(0, 3, 1, 2)


# ---- the rows

@dataclasses.dataclass
class Group:
    """Methods that compute the same thing; the first is torchjac's, the others are the baselines."""
    methods: Dict[str, Callable]        # name -> fn(f, batch): the output, or for a training step the loss
    expected: Optional[Callable] = None  # (oracle64, batch64) -> the float64 output; None for a training step
    reference: Optional[str] = None      # a training step's create_graph baseline, the gradients' reference
    oracle: Optional[Callable] = None    # (f64, batch64) -> what expected reads; None: vmap(jacrev)'s J
    flops: Optional[Callable] = None     # (f, batch) -> the multiply-adds x2 of torchjac's pass, for GFLOP/s

    @property
    def train(self):
        return self.expected is None


@dataclasses.dataclass
class Row:
    title: str
    build: Callable       # () -> the model (float32, seeded)
    points: int
    groups: Dict[str, Group]
    # "points", "cnf" (cond = time per point, noise), "ode" (one time t, noise), "latent" (one shape code)
    # or "channels_first" (B, 3, N)
    kind: str = "points"
    d: int = 3  # the points' features
    # ReLU's kinks: a float32 pre-activation on the other side of 0 than float64's flips a slope, which moves
    # a point's derivative by far more than rounding (the baseline's too), so the check runs every method in
    # float64 instead
    check_float64: bool = False
    x_arg: Optional[str] = None  # "ode" rows: the name of x in forward(t, x)


def sdf_groups():
    return {
        "gradient": Group({"torchjac": lambda f, b: torchjac.jacobian(f, b.x),
                           "autograd_grad": lambda f, b: autograd_sdf(f, b.x)[1]},
                          expected=lambda J, b: J),
        "eikonal step": Group({"torchjac": lambda f, b: eikonal(*torchjac.jacobian(f, b.x, return_output=True)),
                               "autograd_create_graph": lambda f, b: eikonal(*autograd_sdf(f, b.x, True))},
                              reference="autograd_create_graph"),
    }


def neus_gradient(f, x, create_graph=False):
    """NeuS's SDFNetwork.gradient: autograd.grad of the sdf, the first of the network's 257 outputs."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x)[:, :1]
        grad = torch.autograd.grad(y.sum(), x, create_graph=create_graph)[0]
    return y, grad[:, None, :]


def oracle_sdf_gradient(f, b):
    """vmap(jacrev) of the float64 model's sdf output alone: all 257 rows would take tens of GB."""
    return vmap(jacrev(lambda p: f(p[None])[0, :1]), chunk_size=512)(b.x)


def neus_groups():
    return {
        "gradient": Group({"torchjac": lambda f, b: torchjac.jacobian(f, b.x, outputs=slice(0, 1)),
                           "autograd_grad": lambda f, b: neus_gradient(f, b.x)[1]},
                          expected=lambda J, b: J, oracle=oracle_sdf_gradient),
        "eikonal step": Group({"torchjac": lambda f, b: eikonal(*torchjac.jacobian(f, b.x, outputs=slice(0, 1),
                                                                                 return_output=True)),
                               "autograd_create_graph": lambda f, b: eikonal(*neus_gradient(f, b.x, True))},
                              reference="autograd_create_graph"),
    }


def deepsdf_net():
    """DeepSDF's decoder as its experiments configure it (latent 256, 8 x 512, latent and xyz into layer 4,
    weight_norm, dropout, eval mode), fed one shape code for all points as LatentSDF does."""
    decoder = zoo.DeepSDFDecoder(latent_size=256, dims=[512] * 8, dropout=tuple(range(8)),
                                 norm_layers=tuple(range(8)), latent_in=(4,))
    return zoo.LatentSDF(decoder).eval()


def with_code(f, b):
    """The field of the points alone, the shape code b.cond fixed: what DeepSDF differentiates for normals."""
    return lambda p: f(p, b.cond)


def deepsdf_groups():
    return {
        "gradient": Group({"torchjac": lambda f, b: torchjac.jacobian(f, b.x, cond=b.cond),
                           "autograd_grad": lambda f, b: autograd_sdf(with_code(f, b), b.x)[1]},
                          expected=lambda J, b: J),
        "eikonal step": Group({"torchjac": lambda f, b: eikonal(*torchjac.jacobian(f, b.x, cond=b.cond,
                                                                                 return_output=True)),
                               "autograd_create_graph": lambda f, b: eikonal(*autograd_sdf(with_code(f, b), b.x,
                                                                                           True))},
                              reference="autograd_create_graph"),
    }


def deformation_mlp(width=128, depth=4):
    layers, n = [], 3
    for _ in range(depth):
        layers += [nn.Linear(n, width), nn.Softplus()]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, 3))


def autograd_jacobian_loop(f, x, create_graph=False):
    """One autograd.grad per output component: what deformation-field code does today."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=create_graph, retain_graph=True)[0]
                for i in range(y.shape[1])]
    return torch.stack(rows, 1)


def jacobian_penalty(jac):
    """Nerfies-style regularizer on the deformation's Jacobian: ||J - I||^2."""
    return ((jac - torch.eye(3, dtype=jac.dtype)) ** 2).sum(-1).sum(-1).mean()


def deformation_groups():
    return {
        "jacobian": Group({"torchjac": lambda f, b: torchjac.jacobian(f, b.x),
                           "autograd_loop": lambda f, b: autograd_jacobian_loop(f, b.x),
                           "vmap_jacrev": lambda f, b: vmap(jacrev(f))(b.x)},
                          expected=lambda J, b: J),
        "train step": Group({"torchjac": lambda f, b: jacobian_penalty(torchjac.jacobian(f, b.x)),
                             "autograd_create_graph":
                                 lambda f, b: jacobian_penalty(autograd_jacobian_loop(f, b.x, True))},
                            reference="autograd_create_graph"),
    }


def cnf_groups():
    def tj_exact(f, b):
        return torchjac.divergence(f, b.x, cond=b.cond, return_output=True)

    def tj_hutchinson(f, b):
        return torchjac.divergence(f, b.x, cond=b.cond, estimator="hutchinson", noise=b.noise, return_output=True)

    return {
        "divergence": Group({"torchjac": lambda f, b: tj_exact(f, b)[1],
                             "divergence_bf": lambda f, b: divergence_bf(f, b)[1]},
                            expected=lambda J, b: J.diagonal(0, -2, -1).sum(-1)),
        "hutchinson": Group({"torchjac": lambda f, b: tj_hutchinson(f, b)[1],
                             "divergence_approx": lambda f, b: divergence_approx(f, b)[1]},
                            expected=hutchinson),
        "step exact": Group({"torchjac": lambda f, b: cnf_loss(*tj_exact(f, b)),
                             "divergence_bf": lambda f, b: cnf_loss(*divergence_bf(f, b, True))},
                            reference="divergence_bf"),
        "step hutchinson": Group({"torchjac": lambda f, b: cnf_loss(*tj_hutchinson(f, b)),
                                  "divergence_approx": lambda f, b: cnf_loss(*divergence_approx(f, b, True))},
                                 reference="divergence_approx"),
    }


# ---- FFJORD row: its ODEnet, forward(t, y), with one time t for all points

def ffjord_net():
    """FFJORD's tabular dynamics at MINIBOONE's size: d = 43, concatsquash layers 860-860, softplus."""
    return zoo.ODEnet((860, 860), 43, "concatsquash", "softplus")


def time_first(f):
    """FFJORD's odefunc(t, y) as the CNF baselines above call their dynamics, f(y, t)."""
    return lambda y, t: f(t, y)


def oracle_ode_jacobian(f, b):
    return vmap(jacrev(lambda p: f(b.cond, p[None])[0]), chunk_size=256)(b.x)


def ode_groups(x_arg):
    """Dynamics forward(t, <x_arg>) with one t: torchjac given x_arg, against FFJORD's (and torchdiffeq's
    trace_df_dz, the same loop) divergence_bf and divergence_approx."""
    def tj_exact(f, b):
        return torchjac.divergence(f, b.x, cond=b.cond, x_arg=x_arg, return_output=True)

    def tj_hutchinson(f, b):
        return torchjac.divergence(f, b.x, cond=b.cond, x_arg=x_arg, estimator="hutchinson", noise=b.noise,
                                   return_output=True)

    return {
        "divergence": Group({"torchjac": lambda f, b: tj_exact(f, b)[1],
                             "divergence_bf": lambda f, b: divergence_bf(time_first(f), b)[1]},
                            expected=lambda J, b: J.diagonal(0, -2, -1).sum(-1), oracle=oracle_ode_jacobian),
        "hutchinson": Group({"torchjac": lambda f, b: tj_hutchinson(f, b)[1],
                             "divergence_approx": lambda f, b: divergence_approx(time_first(f), b)[1]},
                            expected=hutchinson, oracle=oracle_ode_jacobian),
        "step exact": Group({"torchjac": lambda f, b: cnf_loss(*tj_exact(f, b)),
                             "divergence_bf": lambda f, b: cnf_loss(*divergence_bf(time_first(f), b, True))},
                            reference="divergence_bf"),
        "step hutchinson": Group({"torchjac": lambda f, b: cnf_loss(*tj_hutchinson(f, b)),
                                  "divergence_approx":
                                      lambda f, b: cnf_loss(*divergence_approx(time_first(f), b, True))},
                                 reference="divergence_approx"),
    }


# ---- PINN row: the Laplacian and Hessian of a scalar field, and a Poisson residual step

def poisson_mlp(width=128, depth=4):
    layers = [nn.Linear(3, width), nn.Tanh()]
    for _ in range(depth - 1):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers, nn.Linear(width, 1))


def nested_autograd_hessian(f, x, create_graph=False):
    """What PINN code does today: the gradient with create_graph, then one autograd.grad per input dim.
    (P, 1, 3, 3) for a scalar field; a Laplacian takes its diagonal, which costs the same."""
    x = x.detach().requires_grad_()
    with torch.enable_grad():
        y = f(x)
        grad, = torch.autograd.grad(y.sum(), x, create_graph=True)
        rows = [torch.autograd.grad(grad[:, j].sum(), x, create_graph=create_graph, retain_graph=True)[0]
                for j in range(x.shape[1])]
    return y, torch.stack(rows, -2).unsqueeze(1)


def nested_poisson_loss(f, b):
    u, hess = nested_autograd_hessian(f, b.x, create_graph=True)
    return poisson_loss(u, trace(hess), b.x)


def vmap_hessian(f, x):
    return vmap(hessian(lambda p: f(p[None])[0]))(x)


def oracle_hessian(f, b):
    return vmap(hessian(lambda p: f(p[None])[0]), chunk_size=4096)(b.x)


def poisson_loss(u, lap, x):
    return ((lap - torch.sin(x).sum(-1, keepdim=True)) ** 2).mean() + (u ** 2).mean()


def pass_flops(f, b, rows):
    """Multiply-adds x2 of carrying `rows` rows per point through f's Linear layers."""
    return 2 * b.x.shape[0] * rows * sum(m.weight.numel() for m in f.modules() if isinstance(m, nn.Linear))


def trace(hess):
    return hess.diagonal(0, -2, -1).sum(-1)


def pinn_groups():
    return {
        "laplacian": Group({"torchjac": lambda f, b: torchjac.laplacian(f, b.x),
                            "nested_autograd": lambda f, b: trace(nested_autograd_hessian(f, b.x)[1]),
                            "vmap_hessian": lambda f, b: trace(vmap_hessian(f, b.x))},
                           expected=lambda H, b: trace(H), oracle=oracle_hessian,
                           flops=lambda f, b: pass_flops(f, b, 1 + 3 + 1)),
        "hessian": Group({"torchjac": lambda f, b: torchjac.hessian(f, b.x),
                          "nested_autograd": lambda f, b: nested_autograd_hessian(f, b.x)[1],
                          "vmap_hessian": lambda f, b: vmap_hessian(f, b.x)},
                         expected=lambda H, b: H, oracle=oracle_hessian,
                         flops=lambda f, b: pass_flops(f, b, 1 + 3 + 6)),
        "pinn step": Group({"torchjac": lambda f, b: poisson_loss(*torchjac.laplacian(f, b.x, return_output=True),
                                                                   b.x),
                            "nested_autograd_create_graph": nested_poisson_loss},
                           reference="nested_autograd_create_graph"),
    }


def pointnet():
    m = zoo.pointnet_shared_mlp((64, 128, 256))
    with torch.no_grad():  # trained-looking BatchNorm statistics
        for bn in m:
            if isinstance(bn, nn.BatchNorm1d):
                bn.running_mean.normal_(0, 0.1)
                bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


ROWS = {
    "deform": Row("3-128x4-3 Softplus deformation field, nn.Sequential", deformation_mlp, 65536,
                  deformation_groups()),
    "sdf": Row("3-256x4-1 Softplus(100), nn.Sequential", sdf_mlp, 16384, sdf_groups()),
    "igr": Row("zoo.IGRImplicitNet 3-512x8-1, skip into layer 4",
               lambda: zoo.IGRImplicitNet(dims=[512] * 8, skip_in=(4,)), 4096, sdf_groups()),
    "neus": Row("zoo.NeuSSDFNetwork as published: multires 6, 3-256x8-257, skip into layer 4, weight_norm",
                lambda: zoo.NeuSSDFNetwork(d_feature=256, width=256, n_layers=8, skip_in=(4,), multires=6),
                4096, neus_groups()),
    "deepsdf": Row("zoo.DeepSDFDecoder as DeepSDF's experiments: latent 256, 8 x 512, latent_in (4,), "
                   "weight_norm, eval; one shape code as cond", deepsdf_net, 4096, deepsdf_groups(), "latent", check_float64=True),
    "siren": Row("zoo.Siren(3, 256, 3, 1).net", lambda: zoo.Siren(3, 256, 3, 1).net, 16384, sdf_groups()),
    "cnf": Row("CNF dynamics 3+1-256x3-3 Tanh, t.expand(x.shape[0], 1)", ODEFunc, 16384, cnf_groups(), "cnf"),
    "cnf_ffjord": Row("CNF dynamics 3+1-256x3-3 Tanh, ones_like(x[:, :1]) * t", FFJORDODEFunc, 16384,
                      cnf_groups(), "cnf"),
    "ffjord": Row("zoo.ODEnet as FFJORD's MINIBOONE: 43-860x2-43 concatsquash, softplus, one t",
                  ffjord_net, 1024, ode_groups("y"), "ode", d=43, x_arg="y"),
    "hyper_cnf": Row("zoo.HyperCNF as torchdiffeq's cnf example: 2-d, width 64, hypernetwork 1-32-32, one t, "
                     "512 samples", lambda: zoo.HyperCNF(2, 32, 64), 512, ode_groups("z"), "ode", d=2, x_arg="z"),
    "pointnet": Row("zoo.pointnet_shared_mlp((64, 128, 256)), eval, (4, 3, N)", pointnet, 4096,
                    {"jacobian": Group({"torchjac": lambda f, b: torchjac.jacobian(f, b.x),
                                        "vmap_jacfwd": pointnet_vmap_jacfwd,
                                        "jvp_per_input": pointnet_jvp_per_input,
                                        "autograd_loop": pointnet_autograd_loop},
                                       expected=lambda J, b: J)},
                    "channels_first"),
    "pinn": Row("3-128x4-1 Tanh scalar field, nn.Sequential", poisson_mlp, 16384, pinn_groups()),
}


def build(row, dtype=torch.float32):
    torch.manual_seed(0)
    return row.build().to(dtype)


def make_batch(row, points, dtype=torch.float32):
    """The same points (drawn in float32) in either dtype."""
    g = torch.Generator().manual_seed(1)
    if row.kind == "channels_first":
        return Batch(torch.randn(4, 3, max(1, points // 4), generator=g).to(dtype))
    x = torch.randn(points, row.d, generator=g).to(dtype)
    if row.kind == "points":
        return Batch(x)
    noise = (torch.randint(0, 2, (points, row.d), generator=g) * 2 - 1).to(dtype)
    if row.kind == "latent":  # one shape code for all points
        return Batch(x, 0.1 * torch.randn(1, 256, generator=g).to(dtype))
    if row.kind == "ode":  # FFJORD's odeint passes one t
        return Batch(x, torch.tensor([0.5], dtype=dtype), noise)
    return Batch(x, torch.full((points, 1), 0.5, dtype=dtype), noise)


def oracle_jacobian(f, b):
    """vmap(jacrev) (jacfwd for the channels-first model) of the float64 model, each point a batch of one."""
    if b.cond is not None and b.cond.shape[0] != b.x.shape[0]:  # one code shared by all points
        return vmap(jacrev(lambda p: f(p[None], b.cond)[0]), chunk_size=1024)(b.x)
    if b.cond is not None:
        return vmap(jacrev(lambda p, t: f(p[None], t[None])[0]), chunk_size=4096)(b.x, b.cond)
    if b.x.dim() == 3:  # jacfwd: vmap(jacrev) through eval BatchNorm1d takes minutes and tens of GB here
        return per_point(vmap(jacfwd(pointwise(f)), chunk_size=256)(b.x.movedim(1, -1).reshape(-1, 3)), b.x)
    return vmap(jacrev(lambda p: f(p[None])[0]), chunk_size=4096)(b.x)


def explain(row_name):
    """explain()'s path for the row's model, and whether a torchjac op actually ran."""
    row = ROWS[row_name]
    f, b = build(row), make_batch(row, 8)
    why = torchjac.explain(f, b.x, cond=b.cond, x_arg=row.x_arg)
    with ops_seen() as seen, torch.no_grad():
        next(iter(row.groups.values())).methods["torchjac"](f, b)
    ran = "fused" if any(op.startswith("torchjac.") for op in seen) else "generic"
    path = why.path if ran == why.path else f"{why.path}, but ran {ran}"
    return {"path": path, "detail": why.detail}


def check_training(row, points=64):
    """Each training step's loss and parameter gradients in float64 against the create_graph baseline's."""
    f, b = build(row, torch.float64), make_batch(row, points, torch.float64)
    for gname, group in row.groups.items():
        if not group.train:
            continue
        grads = {}
        for name, fn in group.methods.items():
            f.zero_grad(set_to_none=True)
            loss = fn(f, b)
            loss.backward()
            # J does not depend on the last bias: no gradient there is a zero gradient
            grads[name] = [loss.detach()] + [torch.zeros_like(p) if p.grad is None else p.grad.clone()
                                             for p in f.parameters()]
        for name, got in grads.items():
            for a, e in zip(got, grads[group.reference]):
                err = ((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
                if not err < 1e-8:
                    raise SystemExit(f"{gname} / {name}: float64 loss or parameter gradient off by {err:.2e} "
                                     f"from {group.reference}'s; not timing a wrong answer")


def step(group, fn, f, b):
    """One call as it is timed: a training step with its backward, or the derivative without autograd."""
    if group.train:
        f.zero_grad(set_to_none=True)
        fn(f, b).backward()
    else:
        with torch.no_grad():
            return fn(f, b)


def measure(row, points, repeats):
    """{group: {method: seconds}}, every derivative checked against the float64 oracle first."""
    f, b = build(row), make_batch(row, points)
    f64, b64 = build(row, torch.float64), make_batch(row, points, torch.float64)
    oracles = {}
    out = {}
    for gname, group in row.groups.items():
        if not group.train:
            oracle = group.oracle or oracle_jacobian
            if oracle not in oracles:
                oracles[oracle] = oracle(f64, b64).detach()
            expected = group.expected(oracles[oracle], b64)
            fc, bc = (f64, b64) if row.check_float64 else (f, b)
            for name, fn in group.methods.items():
                check(f"{gname} / {name}", step(group, fn, fc, bc).reshape(expected.shape), expected)
        out[gname] = {name: timeit(lambda fn=fn: step(group, fn, f, b), repeats)
                      for name, fn in group.methods.items()}
    return out


@contextlib.contextmanager
def busy_core():
    """Another process keeping one core busy, as on a shared machine."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def peak_rss_mb(row, group, method, points, threads):
    """Peak RSS increase of one call, in a fresh process so earlier runs do not hide it."""
    code = (f"import sys; sys.path.insert(0, {HERE!r}); import bench_models as b; "
            f"b.measure_rss({row!r}, {group!r}, {method!r}, {points}, {threads})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_rss(row_name, gname, method, points, threads):
    """Prints the peak RSS above the RSS before the call, in MB (Linux: resets VmHWM first)."""
    torch.set_num_threads(threads)
    row = ROWS[row_name]
    group = row.groups[gname]
    f, b = build(row), make_batch(row, points)
    step(group, group.methods[method], f, make_batch(row, 64))  # one-time allocations are not counted
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    before = _status_kb("VmRSS")
    step(group, group.methods[method], f, b)
    print((_status_kb("VmHWM") - before) / 1024)


def memory(row_name, points, threads):
    return {g: {m: peak_rss_mb(row_name, g, m, points, threads) for m in group.methods}
            for g, group in ROWS[row_name].groups.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-busy", dest="busy", action="store_false", help="skip the runs beside a busy core")
    p.add_argument("--no-memory", dest="memory", action="store_false", help="skip the peak-RSS subprocesses")
    p.add_argument("--points-sweep", type=int, nargs="*", default=None,
                   help="points for the sdf row's sweep (default 1024 4096 16384 65536); none to skip it")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, no memory: a smoke test")
    p.add_argument("--out", default="bench/out/models.json")
    args = p.parse_args()
    if args.quick:
        args.repeats, args.memory = 1, False
    if args.points_sweep is None:
        args.points_sweep = [256, 1024] if args.quick else [1024, 4096, 16384, 65536]
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} threads, "
          f"float32; ratio = baseline ms / torchjac ms")
    results = {"torch": torch.__version__, "threads": args.threads, "gemm_gflops": gemm_gflops(), "rows": {},
               "sweep": {}}
    print(f"fp32 GEMM rate of this machine (best 2048^3 matmul): {results['gemm_gflops']:.1f} GFLOP/s")
    for name in args.rows:
        row = ROWS[name]
        points = max(64, row.points // 32) if args.quick else row.points
        check_training(row)
        entry = {"title": row.title, "points": points, "explain": explain(name),
                 "quiet": measure(row, points, args.repeats)}
        if args.busy:
            with busy_core():
                entry["busy"] = measure(row, points, args.repeats)
        if args.memory:
            entry["peak_rss_mb"] = memory(name, points, args.threads)
        f, b = build(row), make_batch(row, points)
        entry["torchjac_gflops"] = {g: group.flops(f, b) / entry["quiet"][g]["torchjac"] / 1e9
                                    for g, group in row.groups.items() if group.flops}
        results["rows"][name] = entry
        report(name, entry, results["gemm_gflops"])
    if args.points_sweep:
        results["sweep"]["sdf"] = sweep("sdf", args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(results, fh, indent=2)
    png = os.path.splitext(args.out)[0] + ".png"
    plot(results["sweep"], png)
    print(f"wrote {args.out} and {png}")


def sweep(name, args):
    """{group: {method: {"points": [...], "seconds": [...], "peak_rss_mb": [...]}}} over args.points_sweep."""
    out = {g: {m: {"points": [], "seconds": [], "peak_rss_mb": []} for m in group.methods}
           for g, group in ROWS[name].groups.items()}
    print(f"\n{name} points sweep")
    for points in args.points_sweep:
        seconds = measure(ROWS[name], points, args.repeats)
        rss = memory(name, points, args.threads) if args.memory else None
        for g, methods in out.items():
            for m, series in methods.items():
                series["points"].append(points)
                series["seconds"].append(seconds[g][m])
                if rss:
                    series["peak_rss_mb"].append(rss[g][m])
            print(f"  {points:>7} {g:<14} " + "  ".join(f"{m} {1e3 * seconds[g][m]:.1f} ms" for m in methods))
    return out


def report(name, entry, gemm_rate):
    why = entry["explain"]
    print(f"\n{name}: {entry['title']}, {entry['points']} points\n  explain: {why['path']}: {why['detail'][:150]}")
    print(f"  {'':<16} {'method':<22} {'ms':>9} {'ratio':>7} {'busy ms':>9} {'ratio':>7} {'peak MB':>8}")

    def cols(times, m):
        if not times:
            return f"{'':9} {'':7}"
        ratio = "" if m == "torchjac" else f"{times[m] / times['torchjac']:.2f}x"
        return f"{1e3 * times[m]:9.1f} {ratio:>7}"

    for g, quiet in entry["quiet"].items():
        busy = entry.get("busy", {}).get(g)
        for i, m in enumerate(quiet):
            mem = entry.get("peak_rss_mb", {}).get(g, {}).get(m)
            print(f"  {g if i == 0 else '':<16} {m:<22} {cols(quiet, m)} {cols(busy, m)} "
                  f"{'' if mem is None else f'{mem:8.0f}'}")
    for g, rate in entry.get("torchjac_gflops", {}).items():
        print(f"  torchjac {g}: {rate:.1f} GFLOP/s of its GEMMs' work, {100 * rate / gemm_rate:.0f}% of the GEMM rate")


def plot(sweeps, path):
    """Time and peak memory against points, per method, log-log: two panels per swept group."""
    if not sweeps:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(row, g, methods) for row, groups in sweeps.items() for g, methods in groups.items()]
    fig, axes = plt.subplots(len(panels), 2, figsize=(10, 3.6 * len(panels)), squeeze=False)
    for (row, g, methods), (ax_t, ax_m) in zip(panels, axes):
        for m, s in methods.items():
            ax_t.loglog(s["points"], [1e3 * t for t in s["seconds"]], "o-", label=m)
            if s["peak_rss_mb"]:
                ax_m.loglog(s["points"], [max(mb, 0.1) for mb in s["peak_rss_mb"]], "o-", label=m)
        ax_t.set(title=f"{row} {g}: time", xlabel="points", ylabel="ms")
        ax_m.set(title=f"{row} {g}: peak RSS increase", xlabel="points", ylabel="MB")
        if not any(s["peak_rss_mb"] for s in methods.values()):
            ax_m.text(0.5, 0.5, "not measured (--no-memory)", ha="center", va="center", transform=ax_m.transAxes)
            ax_m.set(xticks=[], yticks=[])
        for ax in (ax_t, ax_m):
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
