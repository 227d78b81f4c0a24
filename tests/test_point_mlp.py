"""PointMLP as an ordinary module, and parameters read at call time."""
import torch
from torch import nn

import torchjac
from conftest import assert_close64, oracle_jacobian


def test_forward_matches_hand_written_network():
    f = torchjac.PointMLP(3, [8, 8], 2, activation="tanh", cond_features=2, skip_layers=(2,)).double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    cond = torch.randn(4, 1, 2, dtype=torch.float64)
    inp = torch.cat([x, cond.expand(4, 5, 2)], -1)
    l0, l1, l2 = f.layers
    h = torch.tanh(l0(inp))
    h = torch.tanh(l1(h))
    expected = l2(torch.cat([h, inp], -1))
    assert_close64(f(x, cond), expected)
    assert [l.in_features for l in f.layers] == [5, 8, 13]
    assert isinstance(f.layers, nn.ModuleList)


def test_activation_instance_and_no_bias():
    f = torchjac.PointMLP(2, [6], 2, activation=nn.Softplus(beta=100), bias=False).double()
    assert all(layer.bias is None for layer in f.layers)
    x = torch.randn(7, 2, dtype=torch.float64)
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])


def test_module_changes_between_calls_are_seen():
    f = torchjac.PointMLP(3, [8], 3, activation="silu").double()
    x = torch.randn(6, 3, dtype=torch.float64)
    first = torchjac.jacobian(f, x)
    with torch.no_grad():
        f.layers[0].weight.mul_(2.0)
    second = torchjac.jacobian(f, x)
    assert_close64(second, oracle_jacobian(f, x)[1])
    assert (second - first).abs().max() > 1e-3
    f.layers[1] = nn.Linear(8, 3).double()
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])
    f.activation = nn.GELU()
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])
