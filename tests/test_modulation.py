"""Layers modulated by cond (FiLM, pi-GAN, FFJORD's gates) and layers whose weights cond computes.

For one cond shared by all points, what the forward computes from cond alone is replayed at each call and
folded into the layers' weights (torchjac/trace.py, the cond program); gradients reach the modules that
compute it through autograd. Checked against torch.func and create_graph autograd in float64.
"""
import pytest
import torch
from torch import nn

import torchjac
from conftest import assert_close64, autograd_jacobian, oracle_hessian, oracle_jacobian
from ops_seen import ops_seen

F64 = torch.float64
FUSED = {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse", "torchjac.mlp_divergence", "torchjac.mlp_jvp",
         "torchjac.mlp_laplacian"}


class FiLMSiren(nn.Module):
    """pi-GAN's FiLM SIREN: sin(gamma(z) * (W h + b) + beta(z)) per layer, gamma and beta from a latent z."""

    def __init__(self, d_out=1, width=16, latent=6):
        super().__init__()
        self.l0, self.l1, self.out = nn.Linear(3, width), nn.Linear(width, width), nn.Linear(width, d_out)
        self.gamma0, self.beta0 = nn.Linear(latent, width), nn.Linear(latent, width)
        self.mapping = nn.Sequential(nn.Linear(latent, 8), nn.LeakyReLU(0.2), nn.Linear(8, 2 * width))

    def forward(self, x, z):
        h = torch.sin(self.l0(x) * (1 + self.gamma0(z)) + self.beta0(z))
        gamma, beta = self.mapping(z).chunk(2, dim=-1)
        h = torch.sin(gamma * self.l1(h) + beta)
        return self.out(h)


def _model(**kw):
    torch.manual_seed(0)
    return FiLMSiren(**kw).double()


def _inputs(n=12, latent_rows=1):
    torch.manual_seed(1)
    x = (0.7 * torch.randn(n, 3, dtype=F64)).requires_grad_(True)
    z = torch.randn(latent_rows, 6, dtype=F64).requires_grad_(True)
    return x, z


@pytest.mark.parametrize("d_out", [1, 3])
def test_film_with_a_shared_latent_runs_fused(d_out):
    model = _model(d_out=d_out)
    x, z = _inputs()
    why = torchjac.explain(model, cond=True)
    assert why.path == "fused" and "layers [0, 1] modulated by cond" in why.detail, why
    with ops_seen() as seen:
        y, jac = torchjac.jacobian(model, x, cond=z, return_output=True)
    assert seen & FUSED
    y_ref, jac_ref = oracle_jacobian(model, x, z)
    assert_close64(y, y_ref)
    assert_close64(jac, jac_ref)


def test_film_training_gradients_reach_the_modulating_modules_and_the_latent():
    model = _model()
    x, z = _inputs()
    leaves = [x, z, *model.parameters()]

    def loss(y, jac):
        return ((jac.norm(dim=-1) - 1) ** 2).mean() + (y ** 2).mean()

    expected = torch.autograd.grad(loss(*autograd_jacobian(model, x, z)), leaves)
    got = torch.autograd.grad(loss(*torchjac.jacobian(model, x, cond=z, return_output=True)), leaves)
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        assert_close64(g, e)


def test_film_second_order():
    model = _model()
    x, z = _inputs(6)
    _, hess = oracle_hessian(model, x, z)
    with ops_seen() as seen:
        lap = torchjac.laplacian(model, x, cond=z)
    assert "torchjac.mlp_laplacian" in seen
    assert_close64(lap, hess.diagonal(0, -2, -1).sum(-1))
    assert_close64(torchjac.hessian(model, x, cond=z), hess)


def test_a_latent_per_point_takes_the_generic_path():
    """gamma(z) then differs between points: it cannot fold into one weight matrix."""
    model = _model()
    x, z = _inputs(latent_rows=12)
    with ops_seen() as seen:
        jac = torchjac.jacobian(model, x, cond=z)
    assert not seen & FUSED
    assert_close64(jac, oracle_jacobian(model, x, z)[1])


def test_compiled_film_training_step_equals_eager():  # compile test
    model = _model()
    x, z = _inputs()
    leaves = [x, z, *model.parameters()]

    def step(x, z):
        jac = torchjac.jacobian(model, x, cond=z)
        return ((jac.norm(dim=-1) - 1) ** 2).mean()

    expected = torch.autograd.grad(step(x, z), leaves)
    torch._dynamo.reset()
    loss = torch.compile(step, fullgraph=True, backend="aot_eager")(x, z)
    for g, e in zip(torch.autograd.grad(loss, leaves), expected):
        assert_close64(g, e)


class AfterActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1, self.gate = nn.Linear(3, 8), nn.Linear(8, 2), nn.Linear(2, 8)

    def forward(self, x, c):
        return self.l1(torch.tanh(self.l0(x)) * self.gate(c))


class UnknownFunction(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(3, 8)

    def forward(self, x, c):
        return self.l0(x) * torch.special.erf(c).sum()


@pytest.mark.parametrize("cls, reason", [
    (AfterActivation, "modulates a layer's output after its activation"),
    (UnknownFunction, "computes special_erf of cond, which torchjac does not replay"),
])
def test_what_is_not_folded_is_named(cls, reason):
    torch.manual_seed(2)
    model = cls().double()
    why = torchjac.explain(model, cond=True)
    assert why.path == "generic" and reason in why.detail, why
    x, c = torch.randn(5, 3, dtype=F64), torch.randn(1, 2, dtype=F64)
    assert_close64(torchjac.jacobian(model, x, cond=c), oracle_jacobian(model, x, c)[1])


def test_a_0_dim_time_as_torchdiffeq_passes_it():
    """odeint calls func(t, y) with a 0-dim t: it is one cond for all points."""
    import zoo
    torch.manual_seed(4)
    net = zoo.ODEnet((16, 16), 3, "concatsquash", "softplus").double()
    t = torch.tensor(0.3, dtype=F64, requires_grad=True)
    y = torch.randn(9, 3, dtype=F64, requires_grad=True)
    jac = torch.func.vmap(torch.func.jacrev(lambda p: net(t, p[None])[0]))(y)
    with ops_seen() as seen:
        div = torchjac.divergence(net, y, cond=t, x_arg="y")
    assert "torchjac.mlp_divergence" in seen
    assert_close64(div, jac.diagonal(0, -2, -1).sum(-1))
    leaves = [t, *net.parameters()]  # the last layer's shifts do not reach the divergence
    expected = torch.autograd.grad(jac.diagonal(0, -2, -1).sum(), leaves, allow_unused=True, materialize_grads=True)
    got = torch.autograd.grad(div.sum(), leaves, allow_unused=True, materialize_grads=True)
    assert expected[0].abs() > 0
    for g, e in zip(got, expected):
        assert_close64(g, e)
    # a function of (y, t) on the generic path receives t as it was passed
    f = lambda y, t: torch.sin(y) * t  # noqa: E731
    assert_close64(torchjac.divergence(f, y, cond=t), (torch.cos(y) * t).sum(-1))


class Mixed(nn.Module):
    """Two Linear layers of one input, mixed by constants and by cond, then the next layer."""

    def __init__(self, heads=False):
        super().__init__()
        self.heads = heads
        self.a, self.b, self.out = nn.Linear(3, 8), nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x, t):
        ya, yb = self.a(x), self.b(x)
        if self.heads:  # two heads of one input, not mixed: NeRF's alpha and feature layers
            return torch.cat([ya, yb], -1)
        return self.out(torch.tanh(0.5 * ya + (yb - ya) * t))


def test_linear_layers_of_one_input_mixed_by_cond():
    torch.manual_seed(5)
    model = Mixed().double()
    x, t = torch.randn(6, 3, dtype=F64, requires_grad=True), torch.tensor([0.7], dtype=F64, requires_grad=True)
    why = torchjac.explain(model, cond=True)
    assert why.path == "fused" and "layers [0] mixing Linear layers of one input" in why.detail, why
    y_ref, jac_ref = oracle_jacobian(model, x, t)
    y, jac = torchjac.jacobian(model, x, cond=t, return_output=True)
    assert_close64(y, y_ref)
    assert_close64(jac, jac_ref)
    leaves = [x, t, *model.parameters()]
    expected = torch.autograd.grad((autograd_jacobian(model, x, t)[1] ** 2).sum() + y_ref.sum(), leaves)
    for g, e in zip(torch.autograd.grad((jac ** 2).sum() + y.sum(), leaves), expected):
        assert_close64(g, e)


def test_two_heads_of_one_input_are_not_mixed():
    model = Mixed(heads=True).double()
    why = torchjac.explain(model, cond=True)
    assert why.path == "generic" and "shares its input with ['b']" in why.detail, why
    x, t = torch.randn(6, 3, dtype=F64), torch.tensor([0.7], dtype=F64)
    assert_close64(torchjac.jacobian(model, x, cond=t), oracle_jacobian(model, x, t)[1])


# ---- found in review: forms that must not fold (they did, silently) or must fall back (they raised)

class AddWithAlpha(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.b, self.l1 = nn.Linear(3, 8), nn.Linear(2, 8), nn.Linear(8, 2)

    def forward(self, x, c):
        return self.l1(torch.tanh(torch.add(self.l0(x), self.b(c), alpha=3.0)))


class ExpandByShape(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.g, self.l1 = nn.Linear(3, 8), nn.Linear(2, 8), nn.Linear(8, 2)

    def forward(self, x, c):
        return self.l1(torch.tanh(self.l0(x) * self.g(c).expand(x.shape[0], -1)))


class OnesTimesGate(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.g, self.l1 = nn.Linear(3, 8), nn.Linear(2, 8), nn.Linear(8, 2)

    def forward(self, x, c):
        h = self.l0(x)
        return self.l1(torch.tanh(h * (torch.ones_like(h) * torch.sigmoid(self.g(c)))))


class CondTimesParameter(nn.Module):
    """A gate computed from cond with a parameter of the module itself: cond @ W."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(3, 8), nn.Linear(8, 2)
        self.W = nn.Parameter(torch.randn(2, 8))

    def forward(self, x, c):
        return self.l1(torch.tanh(self.l0(x) * torch.sigmoid(c @ self.W)))


@pytest.mark.parametrize("cls, path", [(AddWithAlpha, "generic"), (ExpandByShape, "generic"),
                                       (OnesTimesGate, "generic"), (CondTimesParameter, "fused")])
def test_review_cases_are_exact(cls, path):
    torch.manual_seed(6)
    model = cls().double()
    x, c = torch.randn(5, 3, dtype=F64, requires_grad=True), torch.randn(1, 2, dtype=F64)
    assert torchjac.explain(model, cond=True).path == path
    y_ref, jac_ref = oracle_jacobian(model, x, c)
    assert_close64(torchjac.jacobian(model, x, cond=c), jac_ref)
    if path == "fused":
        leaves = [x, *model.parameters()]
        expected = torch.autograd.grad((autograd_jacobian(model, x, c)[1] ** 2).sum(), leaves, allow_unused=True,
                                       materialize_grads=True)
        got = torch.autograd.grad((torchjac.jacobian(model, x, cond=c) ** 2).sum(), leaves, allow_unused=True,
                                  materialize_grads=True)
        for g, e in zip(got, expected):
            assert_close64(g, e)
