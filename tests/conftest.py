"""Shared helpers. The oracles use torch.func and plain autograd only, never torchjac's own math."""
import pytest
import torch
from hypothesis import HealthCheck, settings
from torch import nn
from torch.func import hessian, jacrev, vmap

import torchjac

# Fuzzing profiles (tests/test_fuzz.py): "short" by default, "long" with --hypothesis-profile=long.
_SLOW_EXAMPLES_OK = [HealthCheck.too_slow, HealthCheck.data_too_large]
settings.register_profile("short", max_examples=200, deadline=None, derandomize=True,
                          suppress_health_check=_SLOW_EXAMPLES_OK)
settings.register_profile("long", max_examples=5000, deadline=None, print_blob=True,
                          suppress_health_check=_SLOW_EXAMPLES_OK)
settings.load_profile("short")

ACTIVATIONS = {
    "relu": nn.ReLU(), "leaky_relu": nn.LeakyReLU(0.2), "softplus": nn.Softplus(beta=3.0, threshold=4.0),
    "silu": nn.SiLU(), "gelu": nn.GELU(), "gelu_tanh": nn.GELU(approximate="tanh"), "tanh": nn.Tanh(),
    "sigmoid": nn.Sigmoid(), "elu": nn.ELU(alpha=0.7), "identity": nn.Identity(), "sine": torchjac.Sine(2.0),
}


def call_model(f, x, cond):
    """f as torchjac calls it: an nn.Sequential receives cat([x, cond]) (broadcast), any other model f(x, cond)."""
    if cond is None:
        return f(x)
    if isinstance(f, nn.Sequential):
        return f(torch.cat(broadcast_inputs(x, cond), -1))
    return f(x, cond)


def broadcast_inputs(x, cond):
    if cond is None:
        return x, None
    lead = torch.broadcast_shapes(x.shape[:-1], cond.shape[:-1])
    return x.expand(*lead, x.shape[-1]), cond.expand(*lead, cond.shape[-1])


def oracle_jacobian(f, x, cond=None):
    """vmap(jacrev) over flattened points: J (..., d_out, d_in) and y."""
    x, cond = broadcast_inputs(x, cond)
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])
    # Each point is evaluated as a batch of one, the way the model is called.
    if cond is None:
        jac = vmap(jacrev(lambda p: call_model(f, p[None], None)[0]))(xf)
    else:
        jac = vmap(jacrev(lambda p, c: call_model(f, p[None], c[None])[0]))(xf, cond.reshape(-1, cond.shape[-1]))
    y = call_model(f, x, cond)
    return y, jac.reshape(*lead, *jac.shape[-2:])


def autograd_jacobian(f, x, cond=None):
    """The create_graph autograd loop users write today; differentiable w.r.t. everything.

    Where cond broadcasts x, each broadcast copy of a point is its own point.
    """
    points = broadcast_inputs(x, cond)[0] if cond is not None else x
    y = call_model(f, points, cond)
    rows = [torch.autograd.grad(y[..., i].sum(), points, create_graph=True)[0] for i in range(y.shape[-1])]
    return y, torch.stack(rows, -2)


def oracle_hessian(f, x, cond=None):
    """vmap(torch.func.hessian) over flattened points: H (..., d_out, d_in, d_in) and y."""
    x, cond = broadcast_inputs(x, cond)
    lead = x.shape[:-1]
    xf = x.reshape(-1, x.shape[-1])
    if cond is None:
        hess = vmap(hessian(lambda p: call_model(f, p[None], None)[0]))(xf)
    else:
        hess = vmap(hessian(lambda p, c: call_model(f, p[None], c[None])[0]))(xf, cond.reshape(-1, cond.shape[-1]))
    return call_model(f, x, cond), hess.reshape(*lead, *hess.shape[-3:])


def autograd_hessian(f, x, cond=None):
    """Nested create_graph autograd, as users write it today; differentiable w.r.t. everything."""
    points = broadcast_inputs(x, cond)[0] if cond is not None else x
    if not points.requires_grad:
        points = points.detach().requires_grad_()
    y = call_model(f, points, cond)
    per_output = []
    for i in range(y.shape[-1]):
        grad, = torch.autograd.grad(y[..., i].sum(), points, create_graph=True)
        # materialize_grads: a linear model's gradient does not depend on the points, its Hessian is 0.
        per_output.append(torch.stack([torch.autograd.grad(grad[..., j].sum(), points, create_graph=True,
                                                           materialize_grads=True)[0]
                                       for j in range(points.shape[-1])], -2))
    return y, torch.stack(per_output, -3)


def replay_noise(kind, shape, seed):
    """The noise torchjac draws from torch.Generator().manual_seed(seed), drawn again as its documentation says:
    Rademacher signs or standard normals in x's dtype (float64 here), (*lead, S, d_in) for the fused ops."""
    g = torch.Generator().manual_seed(seed)
    if kind == "rademacher":
        return torch.randint(0, 2, shape, generator=g, dtype=torch.float64) * 2 - 1
    return torch.randn(shape, generator=g, dtype=torch.float64)


def assert_close64(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10)


def assert_close32(actual, expected):
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * max(scale, 1.0))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
