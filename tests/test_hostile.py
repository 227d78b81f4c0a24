"""Hostile values: NaN and infinities, extreme Softplus, low precision, partial requires_grad, devices."""
import copy

import pytest
import torch
from torch import nn

import torchjac
from conftest import ACTIVATIONS, assert_close64, oracle_jacobian

NONLINEAR = sorted(set(ACTIVATIONS) - {"identity"})
NAN, INF = float("nan"), float("inf")


def _mlp(activation, cond_features=0):
    torch.manual_seed(0)
    return torchjac.PointMLP(3, [16, 16], 3, activation=copy.deepcopy(ACTIVATIONS[activation]),
                             cond_features=cond_features, skip_layers=(1,)).double()


def _all_outputs(f, x, cond=None):
    """{name: (y, out)} of every function, Hutchinson with a fixed noise."""
    v = torch.ones_like(x)
    return {
        "jacobian": torchjac.jacobian(f, x, cond=cond, return_output=True),
        "divergence": torchjac.divergence(f, x, cond=cond, return_output=True),
        "hutchinson": torchjac.divergence(f, x, cond=cond, estimator="hutchinson", noise=v, return_output=True),
        "jvp": torchjac.jvp(f, x, v, cond=cond, return_output=True),
    }


def _expected(name, jac):
    """What _all_outputs' function `name` gives for the Jacobian jac (noise and v are ones)."""
    return {"jacobian": jac, "divergence": jac.diagonal(0, -2, -1).sum(-1), "hutchinson": jac.sum((-2, -1)),
            "jvp": jac.sum(-1)}[name]


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_non_finite_inputs_give_nan_derivatives_at_their_points_only(activation, path):
    f = _mlp(activation, cond_features=2)
    x = torch.randn(7, 3, dtype=torch.float64)
    cond = torch.randn(7, 2, dtype=torch.float64)
    x[1, 0], x[2, 1], x[3, 2] = NAN, INF, -INF
    cond[4, 1] = INF
    bad, good = torch.tensor([1, 2, 3, 4]), torch.tensor([0, 5, 6])
    y_ref, jac_ref = oracle_jacobian(f, x[good], cond[good])
    model = f if path == "fused" else (lambda p, c: f(p, c))  # a lambda takes the generic path
    for name, (y, out) in _all_outputs(model, x, cond).items():
        assert out[bad].isnan().all(), f"{name}: a non-finite input must give NaN, got {out[bad]}"
        assert_close64(out[good], _expected(name, jac_ref))
        # y is f(x) exactly as PyTorch computes it, non-finite entries included
        torch.testing.assert_close(y, f(x, cond), rtol=1e-12, atol=1e-12, equal_nan=True)
        assert_close64(y[good], y_ref)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_a_nan_input_makes_the_training_gradients_nan_not_a_crash(activation):
    f = _mlp(activation)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    with torch.no_grad():
        x[2, 1] = NAN
    jac = torchjac.jacobian(f, x)
    ((jac - torch.eye(3, dtype=torch.float64)) ** 2).sum().backward()
    for name, p in f.named_parameters():
        if name == "layers.2.bias" or (activation == "identity" and name.endswith("bias")):
            # J depends on no bias of a linear model, and on the output bias of none: 0 (or NaN), nothing else
            assert not (p.grad.isfinite() & (p.grad != 0)).any(), f"{name}: {p.grad}"
        else:
            assert p.grad.isnan().any(), f"{name}: the loss is NaN, but its gradient is finite"
    assert x.grad[2].isnan().all()


def test_a_nan_output_weight_makes_the_jacobian_rows_that_use_it_nan():
    f = _mlp("tanh")
    x = torch.randn(6, 3, dtype=torch.float64)
    # Rows 1 and 2 do not read that weight. (The reverse-mode oracle would spread the NaN to every row
    # through 0 * NaN, so it runs on the finite model.)
    expected_rows = oracle_jacobian(f, x)[1][:, 1:]
    with torch.no_grad():
        f.layers[2].weight[0, 5] = NAN  # output 0 reads hidden unit 5
    jac = torchjac.jacobian(f, x)
    assert jac[:, 0].isnan().all()
    assert_close64(jac[:, 1:], expected_rows)


@pytest.mark.parametrize("activation", NONLINEAR)
@pytest.mark.parametrize("where", ["weight", "bias"])
@pytest.mark.parametrize("value", [NAN, INF])
def test_non_finite_hidden_parameters_never_give_a_finite_jacobian(activation, where, value):
    f = _mlp(activation)
    with torch.no_grad():
        getattr(f.layers[1], where)[3] = value  # unit 3 of the middle layer: every output depends on it
    x = torch.randn(6, 3, dtype=torch.float64)
    for name, (y, out) in _all_outputs(f, x).items():
        if where == "bias" and value == INF:
            # An infinite bias saturates unit 3 (slope 0 or 1 for most activations); the Jacobian is
            # the limit, which is defined, so it must equal PyTorch's, NaN where PyTorch's is NaN.
            expected = _expected(name, oracle_jacobian(f, x)[1])
            torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10, equal_nan=True)
        else:
            assert not out.isfinite().any(), f"{name}: a {value} {where} gave finite entries {out}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("beta", [1.0, 100.0, 1e4, 1e7])
def test_softplus_with_large_beta_and_extreme_inputs_is_finite_where_pytorch_is(dtype, beta):
    torch.manual_seed(0)
    f = torchjac.PointMLP(2, [8], 2, activation=nn.Softplus(beta=beta)).to(dtype)
    scale = torch.tensor([0.0, 1e-30, 1e-6, 1.0, 1e3, 1e10, 1e30], dtype=dtype)
    x = torch.stack([torch.cat([scale, -scale]), torch.cat([-scale, scale])], -1)
    y, jac = torchjac.jacobian(f, x, return_output=True)
    y_ref, jac_ref = oracle_jacobian(f, x)
    assert torch.equal(jac.isfinite(), jac_ref.isfinite())
    assert torch.equal(y.isfinite(), y_ref.isfinite())
    tol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(jac, jac_ref, rtol=tol, atol=tol * max(1.0, jac_ref[jac_ref.isfinite()].abs().max()),
                               equal_nan=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_gets_a_clear_error(dtype):
    f = torchjac.PointMLP(3, [8], 3).to(dtype)
    x = torch.randn(4, 3).to(dtype)
    for call in (lambda: torchjac.jacobian(f, x), lambda: torchjac.divergence(f, x),
                 lambda: torchjac.jvp(f, x, x)):
        with pytest.raises(TypeError, match=f"supports float32 and float64, got x of dtype {dtype}"):
            call()


@pytest.mark.parametrize("needs_grad", ["x", "cond", "v", "params", "first_layer_frozen"])
def test_requires_grad_on_some_inputs_only(needs_grad):
    """Gradients reach exactly the inputs that require them, with the oracle's values."""
    f = _mlp("silu", cond_features=2)
    x = torch.randn(5, 3, dtype=torch.float64)
    cond = torch.randn(5, 2, dtype=torch.float64)
    v = torch.randn(5, 3, dtype=torch.float64)
    for p in f.parameters():
        p.requires_grad_(needs_grad in ("params", "first_layer_frozen"))
    if needs_grad == "first_layer_frozen":
        f.layers[0].requires_grad_(False)
    if needs_grad in ("x", "cond", "v"):
        {"x": x, "cond": cond, "v": v}[needs_grad].requires_grad_(True)
    y, out = torchjac.jvp(f, x, v, cond=cond, return_output=True)
    jac = torchjac.jacobian(f, x, cond=cond)
    loss = (out ** 2).sum() + y.sum() + (jac ** 2).sum()
    loss.backward()
    everything = (x, cond, v, *f.parameters())
    assert all(t.grad is None for t in everything if not t.requires_grad)
    grads = [t.grad for t in everything if t.requires_grad]

    f_ref = copy.deepcopy(f)
    x_ref, cond_ref, v_ref = (t.detach().clone().requires_grad_(t.requires_grad) for t in (x, cond, v))
    y_r, jac_r = torch.func.vmap(lambda p, c: (f_ref(p, c), torch.func.jacrev(f_ref)(p, c)))(x_ref, cond_ref)
    loss_ref = ((jac_r @ v_ref.unsqueeze(-1)).squeeze(-1) ** 2).sum() + y_r.sum() + (jac_r ** 2).sum()
    leaves_ref = [t for t, orig in zip((x_ref, cond_ref, v_ref, *f_ref.parameters()), (x, cond, v, *f.parameters()))
                  if orig.requires_grad]
    expected = torch.autograd.grad(loss_ref, leaves_ref)
    assert len(grads) == len(expected) > 0
    for got, want in zip(grads, expected):
        assert_close64(got, want)


def test_inputs_on_another_device_get_a_clear_error():
    """meta stands in for a second device on a CPU-only machine: the checks compare devices, not kinds."""
    f = torchjac.PointMLP(3, [8], 3, cond_features=2)
    x, cond = torch.randn(4, 3), torch.randn(4, 2)
    with pytest.raises(ValueError, match="x has dtype torch.float32 on cpu, but f's parameters have dtype "
                                         "torch.float32 on meta"):
        torchjac.jacobian(copy.deepcopy(f).to("meta"), x, cond=cond)
    with pytest.raises(ValueError, match="cond expected dtype torch.float32 on cpu like x, got dtype "
                                         "torch.float32 on meta"):
        torchjac.jacobian(f, x, cond=cond.to("meta"))
    with pytest.raises(ValueError, match="noise expected dtype torch.float32 on cpu like x"):
        torchjac.divergence(f, x, cond=cond, estimator="hutchinson", noise=x.to("meta"))
    with pytest.raises(ValueError, match="v expected dtype torch.float32 on cpu like x"):
        torchjac.jvp(f, x, x.to("meta"), cond=cond)
    mixed = copy.deepcopy(f)
    mixed.layers[1].to("meta")  # one layer left behind on another device
    with pytest.raises(ValueError, match="f's parameters have dtype torch.float32 on meta"):
        torchjac.jacobian(mixed, x, cond=cond)
