"""jacobian, divergence and jvp against the torch.func oracle."""
import copy

import pytest
import torch
from torch import nn

import torchjac
from conftest import ACTIVATIONS, assert_close32, assert_close64, oracle_jacobian

DIMS = [1, 2, 3, 8]


def point_mlp(d_in, d_out, activation, cond_features=0, skip_layers=(), dtype=torch.float64, bias=True):
    return torchjac.PointMLP(d_in, [16, 12, 16], d_out, activation=copy.deepcopy(activation),
                             cond_features=cond_features, skip_layers=skip_layers, bias=bias).to(dtype)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("d_in", DIMS)
@pytest.mark.parametrize("d_out", DIMS)
def test_jacobian_every_activation_and_dim(name, d_in, d_out):
    f = point_mlp(d_in, d_out, ACTIVATIONS[name])
    x = torch.randn(2, 7, d_in, dtype=torch.float64)
    y, jac = torchjac.jacobian(f, x, return_output=True)
    y_ref, jac_ref = oracle_jacobian(f, x)
    assert jac.shape == (2, 7, d_out, d_in)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("cond_shape", [(2, 1, 4), (2, 5, 4), (1, 1, 4), (4,)], ids=str)
@pytest.mark.parametrize("skips", [(), (2,), (1, 3)], ids=str)
def test_cond_broadcast_and_skips(name, cond_shape, skips):
    f = point_mlp(3, 3, ACTIVATIONS[name], cond_features=4, skip_layers=skips)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    cond = torch.randn(cond_shape, dtype=torch.float64)
    y_ref, jac_ref = oracle_jacobian(f, x, cond)
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)
    assert_close64(torchjac.divergence(f, x, cond=cond), jac_ref.diagonal(0, -2, -1).sum(-1))
    v = torch.randn(2, 5, 3, dtype=torch.float64)
    assert_close64(torchjac.jvp(f, x, v, cond=cond), (jac_ref @ v.unsqueeze(-1)).squeeze(-1))


def test_cond_with_more_points_than_x_broadcasts_x():
    f = point_mlp(3, 3, nn.Tanh(), cond_features=2)
    x = torch.randn(1, 6, 3, dtype=torch.float64)
    cond = torch.randn(4, 1, 2, dtype=torch.float64)
    jac = torchjac.jacobian(f, x, cond=cond)
    assert jac.shape == (4, 6, 3, 3)
    assert_close64(jac, oracle_jacobian(f, x, cond)[1])


def test_time_conditioned_flow_field():
    """A CNF vector field f(x, t) with t of shape (B, 1, 1), as in FFJORD."""
    f = point_mlp(3, 3, nn.Softplus(), cond_features=1)
    x = torch.randn(3, 10, 3, dtype=torch.float64)
    t = torch.rand(3, 1, 1, dtype=torch.float64)
    div = torchjac.divergence(f, x, cond=t)
    assert div.shape == (3, 10)
    assert_close64(div, oracle_jacobian(f, x, t)[1].diagonal(0, -2, -1).sum(-1))


SEQUENTIALS = {
    "plain": lambda: nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 16), nn.SiLU(), nn.Linear(16, 3)),
    "nested": lambda: nn.Sequential(nn.Sequential(nn.Linear(3, 8), nn.GELU()), nn.Sequential(nn.Linear(8, 3))),
    "final_activation": lambda: nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3), nn.Sigmoid()),
    "leading_activation": lambda: nn.Sequential(nn.Tanh(), nn.Linear(3, 8), nn.ELU(), nn.Linear(8, 3)),
    "double_activation": lambda: nn.Sequential(nn.Linear(3, 8), nn.Softplus(), nn.Tanh(), nn.Linear(8, 3)),
    "identity_dropout": lambda: nn.Sequential(nn.Linear(3, 8), nn.Identity(), nn.Dropout(0.5), nn.Tanh(),
                                              nn.Linear(8, 3)).eval(),
    "batchnorm_eval": lambda: nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).eval(),
    "no_bias": lambda: nn.Sequential(nn.Linear(3, 8, bias=False), nn.Tanh(), nn.Linear(8, 3, bias=False)),
    "activation_only": lambda: nn.Sequential(nn.Tanh()),
    "linear_only": lambda: nn.Sequential(nn.Linear(3, 5)),
}


@pytest.mark.parametrize("name", sorted(SEQUENTIALS))
def test_sequential(name):
    f = SEQUENTIALS[name]().double()
    if name == "batchnorm_eval":
        bn = f[1]
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.normal_()
        bn.bias.data.normal_()
    x = torch.randn(24, 3, dtype=torch.float64) if name == "batchnorm_eval" else torch.randn(4, 6, 3, dtype=torch.float64)
    y_ref, jac_ref = oracle_jacobian(f, x)
    y, jac = torchjac.jacobian(f, x, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)


def test_sequential_with_cond_receives_concatenation():
    f = nn.Sequential(nn.Linear(5, 16), nn.Softplus(), nn.Linear(16, 3)).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    cond = torch.randn(2, 1, 2, dtype=torch.float64)
    assert_close64(torchjac.jacobian(f, x, cond=cond), oracle_jacobian(f, x, cond)[1])


def test_seed_002_linear_map_gives_back_w():
    """Seed 002: the Jacobian of y = W x is W, at every point."""
    f = nn.Sequential(nn.Linear(2, 2, bias=False)).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    jac = torchjac.jacobian(f, x)
    assert_close64(jac, f[0].weight.detach().expand(5, 2, 2))


@pytest.mark.parametrize("name", ["softplus", "gelu", "sine", "relu"])
@pytest.mark.parametrize("d", [1, 3, 8])
def test_float32_against_float64_oracle(name, d):
    f64 = point_mlp(d, d, ACTIVATIONS[name], cond_features=2, skip_layers=(2,))
    f32 = copy.deepcopy(f64).float()
    x = torch.randn(3, 50, d, dtype=torch.float64)
    cond = torch.randn(3, 1, 2, dtype=torch.float64)
    y_ref, jac_ref = oracle_jacobian(f64, x, cond)
    y, jac = torchjac.jacobian(f32, x.float(), cond=cond.float(), return_output=True)
    assert jac.dtype == torch.float32
    assert_close32(jac.double(), jac_ref)
    assert_close32(y.double(), y_ref)
    assert_close32(torchjac.divergence(f32, x.float(), cond=cond.float()).double(),
                   jac_ref.diagonal(0, -2, -1).sum(-1))


def test_zero_size_and_arbitrary_leading_dims():
    f = point_mlp(3, 2, nn.Tanh())
    for lead in [(0,), (2, 0, 4), (), (2, 3, 1, 2)]:
        x = torch.randn(*lead, 3, dtype=torch.float64)
        jac = torchjac.jacobian(f, x)
        assert jac.shape == (*lead, 2, 3)
        if x.numel():
            assert_close64(jac, oracle_jacobian(f, x)[1])
    assert torchjac.jvp(f, torch.randn(0, 3, dtype=torch.float64), torch.randn(0, 3, dtype=torch.float64)).shape == (0, 2)


def test_non_contiguous_x():
    f = point_mlp(3, 3, nn.SiLU())
    base = torch.randn(3, 8, 5, dtype=torch.float64)
    x = base[..., 1:4].transpose(0, 1)  # strided in every dim
    assert not x.is_contiguous()
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x.contiguous())[1])
    assert_close64(torchjac.divergence(f, x), oracle_jacobian(f, x.contiguous())[1].diagonal(0, -2, -1).sum(-1))


def test_large_chunked_input_matches_oracle():
    """More points than one chunk holds, so the chunk loop and its seams are exercised."""
    f = point_mlp(3, 3, nn.Softplus(), cond_features=2, skip_layers=(2,))
    x = torch.randn(3, 4000, 3, dtype=torch.float64)
    cond = torch.randn(3, 1, 2, dtype=torch.float64)
    y_ref, jac_ref = oracle_jacobian(f, x, cond)
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)


def test_jvp_broadcast_v():
    f = point_mlp(3, 2, nn.GELU())
    x = torch.randn(4, 6, 3, dtype=torch.float64)
    v = torch.randn(3, dtype=torch.float64)
    _, jac_ref = oracle_jacobian(f, x)
    assert_close64(torchjac.jvp(f, x, v), jac_ref @ v)
