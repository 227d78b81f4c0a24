"""PointNet-style stacks of Conv1d(kernel_size=1) on channels-first (B, C, N) input, on the fused path."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.func import jacrev, vmap

import torchjac
from conftest import assert_close64
from ops_seen import ops_seen


def pointnet(groups=1, bn=True):
    layers = [nn.Conv1d(3, 16, 1), nn.BatchNorm1d(16) if bn else nn.Identity(), nn.ReLU(),
              nn.Conv1d(16, 16, 1, groups=groups), nn.Softplus(beta=2.0), nn.Conv1d(16, 3, 1)]
    f = nn.Sequential(*layers).double().eval()
    if bn:
        f[1].running_mean.normal_()
        f[1].running_var.uniform_(0.5, 2.0)
    return f


def oracle(f, x, cond=None):
    """J[b, n] = d f(x)[b, :, n] / d x[b, :, n], one point at a time."""
    B, C, N = x.shape
    points = x.permute(0, 2, 1).reshape(-1, C)

    def at_point(p, c=None):
        inp = p[None, :, None] if c is None else torch.cat([p, c])[None, :, None]
        return f(inp)[0, :, 0]

    if cond is None:
        jac = vmap(jacrev(at_point))(points)
    else:
        c = cond.expand(B, cond.shape[1], N).permute(0, 2, 1).reshape(-1, cond.shape[1])
        jac = vmap(jacrev(at_point))(points, c)
    return jac.reshape(B, N, *jac.shape[-2:])


@pytest.mark.parametrize("groups", [1, 4])
def test_pointnet_stack_matches_oracle(groups):
    f = pointnet(groups)
    x = torch.randn(2, 3, 11, dtype=torch.float64)
    with ops_seen() as seen:
        y, jac = torchjac.jacobian(f, x, return_output=True)
    assert seen & {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}
    assert jac.shape == (2, 11, 3, 3)
    assert_close64(jac, oracle(f, x))
    assert_close64(y, f(x))
    div = torchjac.divergence(f, x)
    assert div.shape == (2, 11)
    assert_close64(div, oracle(f, x).diagonal(0, -2, -1).sum(-1))
    v = torch.randn(2, 3, 11, dtype=torch.float64)
    jv = torchjac.jvp(f, x, v)
    assert jv.shape == (2, 3, 11)  # in the model's (B, C, N) layout
    assert_close64(jv, torch.einsum("bnij,bjn->bin", oracle(f, x), v))


def test_channels_first_cond():
    f = nn.Sequential(nn.Conv1d(5, 8, 1), nn.Tanh(), nn.Conv1d(8, 3, 1)).double()
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    cond = torch.randn(2, 2, 1, dtype=torch.float64)  # a per-cloud latent, broadcast over points
    assert_close64(torchjac.jacobian(f, x, cond=cond), oracle(f, x, cond))


def test_single_cloud_without_batch_dim():
    f = pointnet(bn=False)
    x = torch.randn(3, 9, dtype=torch.float64)
    assert_close64(torchjac.jacobian(f, x), oracle(f, x[None])[0])


def test_conv1d_gradcheck_and_gradgradcheck():
    conv0, conv1 = nn.Conv1d(3, 4, 1).double(), nn.Conv1d(4, 3, 1).double()
    x = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)

    def fn(x, w0, b0, w1):
        f = nn.Sequential(conv0, nn.Softplus(), conv1)
        params = {"0.weight": w0, "0.bias": b0, "2.weight": w1, "2.bias": conv1.bias}
        return _jacobian_with(f, params, x)

    inputs = (x, conv0.weight.detach().clone().requires_grad_(), conv0.bias.detach().clone().requires_grad_(),
              conv1.weight.detach().clone().requires_grad_())
    assert gradcheck(fn, inputs)
    assert gradgradcheck(fn, inputs)


class _JacobianOf(nn.Module):
    def __init__(self, f):
        super().__init__()
        self.f = f

    def forward(self, x):
        return torchjac.jacobian(self.f, x), torchjac.divergence(self.f, x)


def _jacobian_with(f, params, x):
    return torch.func.functional_call(_JacobianOf(f), {f"f.{k}": v for k, v in params.items()}, (x,))


def test_conv1d_same_padding_with_kernel_one_is_pointwise():
    f = nn.Sequential(nn.Conv1d(3, 8, 1, padding="same"), nn.Tanh(), nn.Conv1d(8, 3, 1, padding="valid")).double()
    x = torch.randn(2, 3, 5, dtype=torch.float64)
    assert_close64(torchjac.jacobian(f, x), oracle(f, x))


def test_conv1d_errors():
    with pytest.raises(ValueError, match=r"takes x of shape \(B, C, N\) or \(C, N\)"):
        torchjac.jacobian(pointnet(), torch.randn(2, 2, 3, 5, dtype=torch.float64))
    with pytest.raises(ValueError, match="mixes neighbouring points"):
        torchjac.jacobian(nn.Sequential(nn.Conv1d(3, 3, 3, padding=1)), torch.randn(1, 3, 5))
