"""Training through the ops: first and second derivatives against autograd and finite differences."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.nn.utils.parametrizations import weight_norm

import torchjac
from conftest import ACTIVATIONS, assert_close64, autograd_jacobian

SMOOTH = ["softplus", "silu", "gelu", "gelu_tanh", "tanh", "sigmoid", "elu", "sine"]


def op_inputs(mode, activation, d_in=3, d_out=3, c=2, skip_layers=(2,), lead=(2, 3), cond_lead=(2, 1)):
    """Leaf tensors and static arguments for a direct op call, float64."""
    torch.manual_seed(1)
    f = torchjac.PointMLP(d_in, [5, 4], d_out, activation=activation, cond_features=c,
                          skip_layers=skip_layers).double()
    from torchjac.spec import lower
    x = torch.randn(*lead, d_in, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(*cond_lead, c, dtype=torch.float64, requires_grad=True)
    spec = lower(f, x, c)
    weights = [w.detach().clone().requires_grad_() for w in spec.weights]
    biases = [b.detach().clone().requires_grad_() for b in spec.biases]
    extra = []
    if mode == "jvp":
        extra = [torch.randn(*lead, 2, d_in, dtype=torch.float64, requires_grad=True)]
    elif mode == "hutchinson":
        extra = [torch.randint(0, 2, (*lead, 3, d_in)).double() * 2 - 1]
    static = (spec.activations, spec.activation_params, spec.skip_layers)
    return x, cond, weights, biases, static, extra


@pytest.mark.parametrize("mode", ["jacobian", "divergence", "jvp", "hutchinson", "jacobian_reverse"])
@pytest.mark.parametrize("name", SMOOTH)
def test_gradcheck_and_gradgradcheck_ops(mode, name):
    d_out = 2 if mode == "jacobian_reverse" else 3
    x, cond, weights, biases, static, extra = op_inputs(mode, ACTIVATIONS[name], d_out=d_out)
    n = len(weights)
    op = getattr(torch.ops.torchjac, f"mlp_{mode}")
    differentiable_extra = extra if mode == "jvp" else []
    constant_extra = extra if mode == "hutchinson" else []

    def fn(x, cond, *rest):
        return op(x, cond, list(rest[:n]), list(rest[n:2 * n]), *static, *rest[2 * n:], *constant_extra)

    inputs = (x, cond, *weights, *biases, *differentiable_extra)
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


@pytest.mark.parametrize("mode", ["jacobian", "divergence", "jvp"])
def test_gradcheck_relu_away_from_kinks(mode):
    # ReLU: piecewise linear, so its second derivative is zero; finite differences work off the kinks.
    x, cond, weights, biases, static, extra = op_inputs(mode, nn.LeakyReLU(0.1), skip_layers=())
    n = len(weights)
    op = getattr(torch.ops.torchjac, f"mlp_{mode}")

    def fn(x, cond, *rest):
        return op(x, cond, list(rest[:n]), list(rest[n:2 * n]), *static, *rest[2 * n:])

    inputs = (x, cond, *weights, *biases, *extra)
    assert gradcheck(fn, inputs, eps=1e-7, atol=1e-5)


def _loss_terms(jac, y):
    eye = torch.eye(jac.shape[-1], dtype=jac.dtype)
    return ((jac - eye) ** 2).sum() + (y ** 2).sum() * 0.1


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_training_gradients_match_create_graph(name):
    """loss.backward() fills .grad of the parameters, x and cond, as the autograd loop does."""
    f = torchjac.PointMLP(3, [16, 16], 3, activation=ACTIVATIONS[name], cond_features=2, skip_layers=(1,)).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(4, 1, 2, dtype=torch.float64, requires_grad=True)

    def grads(jac_fn):
        f.zero_grad()
        x.grad = cond.grad = None
        y, jac = jac_fn()
        div = jac.diagonal(0, -2, -1).sum(-1)
        (_loss_terms(jac, y) + (div ** 2).sum()).backward()
        return [x.grad.clone(), cond.grad.clone()] + [p.grad.clone() for p in f.parameters()]

    expected = grads(lambda: autograd_jacobian(f, x, cond))
    actual = grads(lambda: torchjac.jacobian(f, x, cond=cond, return_output=True))
    for a, e in zip(actual, expected):
        assert_close64(a, e)
    # The same through divergence and jvp.
    def via_div():
        y, div = torchjac.divergence(f, x, cond=cond, return_output=True)
        return y, div

    f.zero_grad(); x.grad = cond.grad = None
    y, div = via_div()
    ((div ** 2).sum() + (y ** 2).sum()).backward()
    got = [x.grad.clone(), cond.grad.clone()] + [p.grad.clone() for p in f.parameters()]
    f.zero_grad(); x.grad = cond.grad = None
    y, jac = autograd_jacobian(f, x, cond)
    ((jac.diagonal(0, -2, -1).sum(-1) ** 2).sum() + (y ** 2).sum()).backward()
    for a, e in zip(got, [x.grad, cond.grad] + [p.grad for p in f.parameters()]):
        assert_close64(a, e)


def test_jvp_gradient_reaches_v():
    f = torchjac.PointMLP(3, [8], 2, activation="tanh").double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = torchjac.jvp(f, x, v)
    g_v, g_x = torch.autograd.grad((out ** 2).sum(), (v, x))
    _, jac = autograd_jacobian(f, x)
    ref = (jac @ v.unsqueeze(-1)).squeeze(-1)
    e_v, e_x = torch.autograd.grad((ref ** 2).sum(), (v, x))
    assert_close64(g_v, e_v)
    assert_close64(g_x, e_x)


def test_weight_norm_parametrization_gets_gradients():
    f = torchjac.PointMLP(3, [16, 16], 1, activation=nn.Softplus(beta=100)).double()
    for i, layer in enumerate(f.layers):
        f.layers[i] = weight_norm(layer)
    x = torch.randn(32, 3, dtype=torch.float64, requires_grad=True)

    def eikonal_grads(jac_fn):
        f.zero_grad()
        _, jac = jac_fn()
        ((jac.squeeze(-2).norm(dim=-1) - 1) ** 2).mean().backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in f.parameters()]

    names = [n for n, _ in f.named_parameters()]
    assert any("original0" in n for n in names)
    expected = eikonal_grads(lambda: autograd_jacobian(f, x))
    actual = eikonal_grads(lambda: torchjac.jacobian(f, x, return_output=True))
    for a, e in zip(actual, expected):
        assert_close64(a, e)


def test_functional_call_reads_given_parameters():
    """torch.func.functional_call swaps in other parameters; the Jacobian must use them."""
    f = torchjac.PointMLP(3, [8], 3, activation="silu").double()
    params = {n: torch.randn_like(p) for n, p in f.named_parameters()}
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    got = torch.func.functional_call(_JacobianOf(f), {f"f.{n}": p for n, p in params.items()}, (x,))
    _, expected = autograd_jacobian(lambda x: torch.func.functional_call(f, params, (x,)), x)
    assert_close64(got, expected)
    _, original = autograd_jacobian(f, x)
    assert (got - original).abs().max() > 1e-3


class _JacobianOf(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return torchjac.jacobian(self.f, x)


def test_third_order_is_refused_not_wrong():
    f = torchjac.PointMLP(3, [8], 3, activation="tanh").double()
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    jac = torchjac.jacobian(f, x)
    g, = torch.autograd.grad(jac.pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="third-order derivatives through the torchjac ops are not supported"):
        torch.autograd.grad(g.pow(2).sum(), x, create_graph=True)
    # Second order (the same call without create_graph) works.
    h, = torch.autograd.grad(g.pow(2).sum(), x)
    assert torch.isfinite(h).all()
