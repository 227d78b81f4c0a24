"""The activation table against PyTorch's own modules and autograd."""
import pytest
import torch

from torchjac import activations as act
from conftest import ACTIVATIONS


def _points():
    z = torch.linspace(-6, 6, 241, dtype=torch.float64)
    return torch.cat([z, torch.tensor([0.0, 1e-3, -1e-3, 1.3333333333333333], dtype=torch.float64)])


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_value_and_derivatives_match_autograd(name):
    module = ACTIVATIONS[name]
    code, p0, p1 = act.encode(module)
    z = _points().requires_grad_()
    torch.testing.assert_close(act.value(code, p0, p1, z), module(z), rtol=0, atol=0)
    d1_autograd, = torch.autograd.grad(module(z).sum(), z, create_graph=True)
    d1 = act.derivative(code, p0, p1, z)
    torch.testing.assert_close(d1, d1_autograd, rtol=1e-12, atol=1e-12)
    if d1_autograd.requires_grad:
        d2_autograd, = torch.autograd.grad(d1_autograd.sum(), z, create_graph=True)
    else:
        d2_autograd = torch.zeros_like(z)
    torch.testing.assert_close(act.second_derivative(code, p0, p1, z), d2_autograd, rtol=1e-10, atol=1e-10)
    if d2_autograd.requires_grad:
        d3_autograd, = torch.autograd.grad(d2_autograd.sum(), z)
    else:
        d3_autograd = torch.zeros_like(z)
    torch.testing.assert_close(act.third_derivative(code, p0, p1, z), d3_autograd, rtol=1e-10, atol=1e-10)


def test_every_code_has_a_module():
    assert {act.encode(m)[0] for m in ACTIVATIONS.values()} == set(act.Act)


def test_unknown_name_is_refused():
    with pytest.raises(ValueError, match="activation expected one of"):
        act.module_from_name("swishy")
