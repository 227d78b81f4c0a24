"""torch.compile(fullgraph=True) of losses built on each API, with backward, equals eager."""
import pytest
import torch
from torch.nn.utils.parametrizations import weight_norm

import torchjac


def _model(cond_features=0):
    torch.manual_seed(0)
    return torchjac.PointMLP(3, [16, 16], 3, activation="softplus", cond_features=cond_features,
                             skip_layers=(1,)).double()


def jacobian_loss(f, x, cond):
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    return ((jac - torch.eye(3, dtype=x.dtype)) ** 2).sum() + (y ** 2).mean()


def divergence_loss(f, x, cond):
    return (torchjac.divergence(f, x, cond=cond) ** 2).sum()


def hutchinson_loss(f, x, cond):
    # Under compile the noise comes from the global RNG; eager and compiled draw the same numbers
    # when seeded the same way, which the test does.
    return torchjac.divergence(f, x, cond=cond, estimator="hutchinson", num_samples=2).sum()


def jvp_loss(f, x, cond):
    return torchjac.jvp(f, x, torch.ones_like(x), cond=cond).pow(2).sum()


LOSSES = {"jacobian": jacobian_loss, "divergence": divergence_loss, "jvp": jvp_loss}


def _grads(loss_fn, f, x, cond):
    f.zero_grad()
    x.grad = cond.grad = None
    loss = loss_fn(f, x, cond)
    loss.backward()
    return [loss.detach(), x.grad.clone(), cond.grad.clone()] + [p.grad.clone() for p in f.parameters()]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_compiled_loss_and_backward_equal_eager(name):
    f = _model(cond_features=2)
    x = torch.randn(2, 40, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(LOSSES[name], fullgraph=True, backend="aot_eager")
    for a, e in zip(_grads(compiled, f, x, cond), _grads(LOSSES[name], f, x, cond)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_compiled_with_inductor_and_weight_norm():
    f = torchjac.PointMLP(3, [16, 16], 1, activation=torch.nn.Softplus(beta=100)).double()
    f.layers[0] = weight_norm(f.layers[0])
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)

    def eikonal(f, x):
        jac = torchjac.jacobian(f, x)
        return ((jac.squeeze(-2).norm(dim=-1) - 1) ** 2).mean()

    def grads(fn):
        f.zero_grad()
        fn(f, x).backward()
        return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in f.parameters()]

    torch._dynamo.reset()
    compiled = torch.compile(eikonal, fullgraph=True)
    expected = grads(eikonal)
    assert any(e.abs().max() > 0 for e in expected)
    for a, e in zip(grads(compiled), expected):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def test_compiled_hutchinson_matches_eager_with_same_seed():
    f = _model(cond_features=2)
    x = torch.randn(2, 40, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(hutchinson_loss, fullgraph=True, backend="aot_eager")
    torch.manual_seed(5)
    got = _grads(compiled, f, x, cond)
    torch.manual_seed(5)
    expected = _grads(hutchinson_loss, f, x, cond)
    for a, e in zip(got, expected):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_compiled_sequential_dynamic_shapes():
    f = torch.nn.Sequential(torch.nn.Linear(3, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3)).double()
    torch._dynamo.reset()
    compiled = torch.compile(lambda x: torchjac.jacobian(f, x), fullgraph=True, dynamic=True)
    for n in (10, 17, 33):
        x = torch.randn(n, 3, dtype=torch.float64)
        torch.testing.assert_close(compiled(x), torchjac.jacobian(f, x), rtol=1e-12, atol=1e-12)
