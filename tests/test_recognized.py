"""User-written MLP modules take the fused path, with the oracle's values and gradients."""
import math

import pytest
import torch
from torch import nn

import torchjac
from conftest import assert_close64, autograd_jacobian, oracle_jacobian
from ops_seen import ops_seen
from user_models import CNFDynamics, LatentDeformation, NeRFMLP, NeuSSDF

MODELS = {
    "nerf": (lambda: NeRFMLP(), 3, None),
    "cnf": (lambda: CNFDynamics(), 3, (2, 1, 1)),
    "neus": (lambda: NeuSSDF(), 3, None),
    "latent_deformation": (lambda: LatentDeformation(), 3, (2, 9, 8)),
}


def _setup(name):
    make, d_in, cond_shape = MODELS[name]
    torch.manual_seed(0)
    f = make().double()
    x = torch.randn(2, 9, d_in, dtype=torch.float64, requires_grad=True)
    cond = None if cond_shape is None else torch.randn(cond_shape, dtype=torch.float64, requires_grad=True)
    return f, x, cond


@pytest.mark.parametrize("name", sorted(MODELS))
def test_takes_the_fused_path(name):
    f, x, cond = _setup(name)
    assert torchjac.explain(f, cond=cond is not None).path == "fused"
    with ops_seen() as seen:
        torchjac.jacobian(f, x, cond=cond)
    assert seen & {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_values_match_the_oracle(name):
    f, x, cond = _setup(name)
    y_ref, jac_ref = oracle_jacobian(f, x.detach(), None if cond is None else cond.detach())
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)
    if jac.shape[-1] == jac.shape[-2]:
        assert_close64(torchjac.divergence(f, x, cond=cond), jac_ref.diagonal(0, -2, -1).sum(-1))
    v = torch.randn_like(x)
    assert_close64(torchjac.jvp(f, x, v, cond=cond), (jac_ref @ v.unsqueeze(-1)).squeeze(-1))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_gradients_match_create_graph(name):
    f, x, cond = _setup(name)
    leaves = [x] + ([cond] if cond is not None else []) + list(f.parameters())

    def grads(jac):
        loss = (jac ** 2).sum() + jac.sum(-1).pow(3).sum()
        return torch.autograd.grad(loss, leaves, allow_unused=True)

    _, jac_ref = autograd_jacobian(f, x, cond)
    expected = grads(jac_ref)
    actual = grads(torchjac.jacobian(f, x, cond=cond))
    for a, e, leaf in zip(actual, expected, leaves):
        assert_close64(torch.zeros_like(leaf) if a is None else a, torch.zeros_like(leaf) if e is None else e)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_compiles_without_graph_break(name):
    f, x, cond = _setup(name)
    torch._dynamo.reset()

    def loss(x, cond):
        return (torchjac.jacobian(f, x, cond=cond) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(x, cond)
    expected = loss(x, cond)
    assert_close64(got, expected)
    g_got = torch.autograd.grad(got, x)[0]
    g_expected = torch.autograd.grad(expected, x)[0]
    assert_close64(g_got, g_expected)


def test_unrecognized_module_says_which_node_stopped_it():
    class Gated(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(3, 8)
            self.out = nn.Linear(8, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.a(x)) * torch.sigmoid(self.b(x)))

    f = Gated().double()
    why = torchjac.explain(f)
    assert why.path == "generic"
    assert "'b'" in why.detail or "mul" in why.detail
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])


def test_explain_reports_each_path():
    assert str(torchjac.explain(torchjac.PointMLP(3, [8], 3))) == ("fused: torchjac.PointMLP; jacobian in forward mode "
                                                                  "(d_in=3, d_out=3); laplacian and hessian in forward "
                                                                  "mode, with second-order rows")
    assert torchjac.explain(nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8))).detail.startswith(
        "nn.Sequential layer '1' (LayerNorm)")
    assert torchjac.explain(nn.Sequential(nn.Conv1d(3, 8, 1), nn.ReLU(), nn.Conv1d(8, 3, 1))).path == "fused"
    assert torchjac.explain(nn.BatchNorm1d(3)).path == "refused"
    assert torchjac.explain(torch.tanh).path == "generic"


# ---- torchdiffeq's hypernetwork CNF: two Linear layers written as per-unit batched matmuls

class _UnitBatched(nn.Module):
    """dz/dt = reduce_u U_u act(W_u . z + B_u), with W (width, d, 1), B (width, 1, 1), U (width, 1, d)
    computed from t, written as torchdiffeq's cnf example writes it, in the variants users write."""

    def __init__(self, d=2, width=8, spread="repeat", reduce="mean", reduce_dim=0, k=1):
        super().__init__()
        self.d, self.width, self.spread, self.reduce, self.reduce_dim, self.k = d, width, spread, reduce, reduce_dim, k
        self.hyper = nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, width * (2 * d * k + 1)))

    def forward(self, t, z):
        p = self.hyper(t.reshape(1, 1)).reshape(-1)
        n = self.width * self.d * self.k
        W = p[:n].reshape(self.width, self.d, self.k)
        U = p[n:2 * n].reshape(self.width, self.k, self.d)
        B = p[2 * n:].reshape(self.width, 1, 1)
        Z = z.unsqueeze(0)
        Z = Z.repeat(self.width, 1, 1) if self.spread == "repeat" else Z.expand(self.width, -1, -1)
        h = torch.tanh(B + torch.matmul(Z, W))
        terms = torch.matmul(h, U)
        return terms.mean(self.reduce_dim) if self.reduce == "mean" else terms.sum(self.reduce_dim)


@pytest.mark.parametrize("spread,reduce", [("repeat", "mean"), ("expand", "sum")])
def test_per_unit_batched_matmuls_are_fused(spread, reduce):
    torch.manual_seed(0)
    f = _UnitBatched(spread=spread, reduce=reduce).double()
    t = torch.tensor([0.3], dtype=torch.float64, requires_grad=True)
    z = torch.randn(11, 2, dtype=torch.float64, requires_grad=True)
    assert torchjac.explain(f, z, cond=t, x_arg="z").path == "fused"
    with ops_seen() as seen:
        y, div = torchjac.divergence(f, z, cond=t, x_arg="z", return_output=True)
    assert seen & {"torchjac.mlp_divergence"}
    y_ref, jac_ref = autograd_jacobian(lambda p, c: f(c, p), z, t)
    assert_close64(y, y_ref)
    assert_close64(div, jac_ref.diagonal(0, -2, -1).sum(-1))
    leaves = [z, t, *f.parameters()]
    expected = torch.autograd.grad((jac_ref.diagonal(0, -2, -1).sum(-1) ** 2).sum() + y_ref.sum(), leaves)
    actual = torch.autograd.grad((div ** 2).sum() + y.sum(), leaves)
    for a, e in zip(actual, expected):
        assert_close64(a, e)


def test_per_unit_weights_of_another_shape_run_generic():
    """W (width, d, 2): each unit is two Linear units, which the recipe (one per unit) does not describe. Known
    only once cond is replayed: explain on the example call says generic, and the call computes the oracle's."""
    torch.manual_seed(0)
    f = _UnitBatched(k=2).double()
    z = torch.randn(7, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3], dtype=torch.float64)
    why = torchjac.explain(f, z, cond=t, x_arg="z")
    assert why.path == "generic" and "a weight of shape (8, 2, 2)" in why.detail, why
    with ops_seen() as seen:
        div = torchjac.divergence(f, z, cond=t, x_arg="z")
    assert not seen & {"torchjac.mlp_divergence", "torchjac.mlp_jacobian"}
    _, jac_ref = autograd_jacobian(lambda p, c: f(c, p), z, t)
    assert_close64(div, jac_ref.diagonal(0, -2, -1).sum(-1))


class _UnitShapes(nn.Module):
    """The hypernetwork CNF's layers with W, B, U of the given shapes, all broadcasting in the user's matmuls."""

    def __init__(self, w_shape, b_shape, u_shape, width=4):
        super().__init__()
        self.shapes, self.width = (w_shape, b_shape, u_shape), width
        self.sizes = [math.prod(shape) for shape in self.shapes]
        self.hyper = nn.Linear(1, sum(self.sizes))

    def forward(self, t, z):
        p = self.hyper(t.reshape(1, 1)).reshape(-1)
        nw, nb = self.sizes[:2]
        W = p[:nw].reshape(self.shapes[0])
        B = p[nw:nw + nb].reshape(self.shapes[1])
        U = p[nw + nb:].reshape(self.shapes[2])
        h = torch.tanh(torch.matmul(z.unsqueeze(0).repeat(self.width, 1, 1), W) + B)
        return torch.matmul(h, U).mean(0)


@pytest.mark.parametrize("w_shape, b_shape, u_shape, path", [
    ((4, 2, 1), (1, 1, 1), (4, 1, 2), "fused"),    # one bias for all units (it crashed the replay before)
    ((1, 2, 1), (4, 1, 1), (4, 1, 2), "fused"),    # one weight row shared by the units
    ((1, 2, 4), (4, 1, 1), (4, 4, 2), "generic"),  # 4 outputs per unit: a reshape read it as other weights
])
def test_per_unit_weights_that_broadcast(w_shape, b_shape, u_shape, path):
    """W, B, U that broadcast over the units are read as such, or left to the generic path, never reinterpreted:
    J equals the oracle's whichever path runs."""
    torch.manual_seed(0)
    f = _UnitShapes(w_shape, b_shape, u_shape).double()
    z = torch.randn(6, 2, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.3], dtype=torch.float64)
    assert torchjac.explain(f, z, cond=t, x_arg="z").path == path
    with ops_seen() as seen:
        jac = torchjac.jacobian(f, z, cond=t, x_arg="z")
    assert bool(seen & {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}) == (path == "fused")
    _, jac_ref = autograd_jacobian(lambda p, c: f(c, p), z, t)
    assert_close64(jac, jac_ref)


def test_per_unit_batch_reduced_over_points_is_refused():
    """A mean over dim 1 (the points) is not a Linear layer of the units: the generic path, and explain says why."""
    f = _UnitBatched(reduce_dim=1).double()
    z = torch.randn(5, 2, dtype=torch.float64)
    t = torch.tensor([0.3], dtype=torch.float64)
    why = torchjac.explain(f, z, cond=t, x_arg="z")
    assert why.path == "generic" and "per-unit batch" in why.detail and "sum or mean over dim 0" in why.detail, why
