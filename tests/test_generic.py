"""The generic path: any point-wise callable, by batched basis-vector JVPs or VJPs."""
import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import torchjac
from conftest import assert_close64, autograd_jacobian
from ops_seen import ops_seen


def per_sample_jacobian(f, x):
    """Oracle: autograd.functional.jacobian of each sample alone, one at a time."""
    return torch.stack([torch.autograd.functional.jacobian(lambda s: f(s[None])[0], xi) for xi in x])


def g(t, x):
    """Seed 000: a tensor-valued g(t, x) with x of shape (k, d1, d2, d3)."""
    w = torch.linspace(0.5, 1.5, x[0].numel(), dtype=x.dtype).reshape(x.shape[1:])
    return torch.tanh(x * w) * t.reshape(-1, 1, 1, 1) + x.flip(-1) * x.sum((1, 2, 3), keepdim=True) * 0.1


def test_seed_000_tensor_valued_function():
    k = 4
    x = torch.randn(k, 3, 2, 2, dtype=torch.float64)
    t = torch.rand(k, dtype=torch.float64)
    jac = torchjac.jacobian(lambda x, t: g(t, x), x, cond=t, event_dims=3)
    assert jac.shape == (k, 3, 2, 2, 3, 2, 2)
    expected = torch.stack([torch.autograd.functional.jacobian(lambda s: g(t[i:i + 1], s[None])[0], x[i])
                            for i in range(k)])
    assert_close64(jac, expected)
    div = torchjac.divergence(lambda x, t: g(t, x), x, cond=t, event_dims=3)
    assert div.shape == (k,)
    assert_close64(div, expected.reshape(k, 12, 12).diagonal(0, -2, -1).sum(-1))


class ResidualBlock(nn.Module):
    def __init__(self, d=3, width=16):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, width), nn.Linear(width, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


@pytest.mark.parametrize("d_out", [2, 3, 7])
def test_residual_block_with_layernorm(d_out):
    block = nn.Sequential(ResidualBlock(), nn.Linear(3, d_out)).double()
    assert torchjac.explain(block).path == "generic"
    x = torch.randn(5, 6, 3, dtype=torch.float64)
    with ops_seen() as seen:
        y, jac = torchjac.jacobian(block, x, return_output=True)
    assert not any(name.startswith("torchjac") for name in seen)
    assert_close64(jac, per_sample_jacobian(block, x.reshape(-1, 3)).reshape(5, 6, d_out, 3))
    assert_close64(y, block(x))


def test_training_through_layernorm_matches_create_graph():
    """Under autograd the generic path takes VJPs; reverse-over-forward through layer_norm would be wrong."""
    f = nn.Sequential(nn.Linear(2, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 5)).double()
    x = torch.randn(8, 2, dtype=torch.float64, requires_grad=True)
    jac = torchjac.jacobian(f, x)
    leaves = [x] + list(f.parameters())[:-1]  # the last bias does not reach J
    got = torch.autograd.grad((jac ** 2).sum(), leaves)
    _, ref = autograd_jacobian(f, x)
    expected = torch.autograd.grad((ref ** 2).sum(), leaves)
    for a, e in zip(got, expected):
        assert_close64(a, e)


def test_jvp_gradients_through_layernorm_match_create_graph():
    f = nn.Sequential(nn.Linear(3, 6), nn.LayerNorm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    x = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    v = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    leaves = [x, v] + list(f.parameters())[:-1]
    got = torch.autograd.grad(torchjac.jvp(f, x, v).pow(2).sum(), leaves)
    _, jac = autograd_jacobian(f, x)
    expected = torch.autograd.grad((jac @ v.unsqueeze(-1)).pow(2).sum(), leaves)
    for a, e in zip(got, expected):
        assert_close64(a, e)


def test_cond_broadcasting_beyond_x_on_the_generic_path():
    f = nn.Sequential(nn.Linear(5, 6), nn.LayerNorm(6), nn.Linear(6, 3)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    cond = torch.randn(2, 1, 2, dtype=torch.float64)
    jac = torchjac.jacobian(f, x, cond=cond)
    assert jac.shape == (2, 4, 3, 3)
    xb, cb = x.expand(2, 4, 3), cond.expand(2, 4, 2)
    expected = per_sample_jacobian(lambda p: f(torch.cat([p, cb.reshape(-1, 2)[:1]], -1)), xb.reshape(-1, 3)[:1])
    assert_close64(jac[0, 0], expected[0])
    flat = torch.stack([torch.autograd.functional.jacobian(lambda p, c=c: f(torch.cat([p, c])), p)
                        for p, c in zip(xb.reshape(-1, 3), cb.reshape(-1, 2))])
    assert_close64(jac.reshape(-1, 3, 3), flat)


def test_wide_input_uses_vjps_and_chunking():
    """d_in > d_out takes the VJP branch; chunk_size only changes how many basis vectors run at once."""
    f = nn.Sequential(nn.LayerNorm(10), nn.Linear(10, 2)).double()
    x = torch.randn(7, 10, dtype=torch.float64)
    expected = per_sample_jacobian(f, x)
    for chunk_size in (None, 1, 3):
        assert_close64(torchjac.jacobian(f, x, chunk_size=chunk_size), expected)


def test_generic_jvp_and_hutchinson():
    f = ResidualBlock().double()
    x = torch.randn(4, 5, 3, dtype=torch.float64)
    v = torch.randn(4, 5, 3, dtype=torch.float64)
    expected = per_sample_jacobian(f, x.reshape(-1, 3)).reshape(4, 5, 3, 3)
    assert_close64(torchjac.jvp(f, x, v), (expected @ v.unsqueeze(-1)).squeeze(-1))
    est = torchjac.divergence(f, x, estimator="hutchinson", num_samples=3, generator=torch.Generator().manual_seed(2))
    e = torch.randint(0, 2, (3, 4, 5, 3), generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 2 - 1
    assert_close64(est, torch.einsum("s...i,...ij,s...j->...", e, expected, e) / 3)


def test_pointmlp_with_event_dims_takes_the_generic_path():
    f = torchjac.PointMLP(2, [8], 2, activation="tanh").double()
    x = torch.randn(3, 4, 2, dtype=torch.float64)  # a point is a (4, 2) block
    jac = torchjac.jacobian(f, x, event_dims=2)
    assert jac.shape == (3, 4, 2, 4, 2)
    expected = torch.stack([torch.autograd.functional.jacobian(f, xi) for xi in x])
    assert_close64(jac, expected)


@pytest.mark.parametrize("norm", [True, False])
def test_generic_gradcheck_and_gradgradcheck(norm):
    block = ResidualBlock(width=4).double()
    if not norm:
        # gradgradcheck of J needs third derivatives of f, and PyTorch's own layer_norm gets those
        # wrong (its double backward treats the saved mean and rstd as constants), so that check
        # runs on the block without the norm.
        block.norm = nn.Tanh()
    params = dict(block.named_parameters())

    def fn(x, w1, b1):
        def model(p):
            return torch.func.functional_call(block, {**params, "fc1.weight": w1, "fc1.bias": b1}, (p,))
        return torchjac.jacobian(model, x), torchjac.divergence(model, x)

    x = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    inputs = (x, params["fc1.weight"].detach().clone().requires_grad_(), params["fc1.bias"].detach().clone()
              .requires_grad_())
    assert gradcheck(fn, inputs)
    if not norm:
        assert gradgradcheck(fn, inputs)


def test_generic_errors():
    with pytest.raises(ValueError, match=r"event_dims expected an int in \[1, x.dim\(\)=2\], got 3"):
        torchjac.jacobian(torch.tanh, torch.randn(4, 3), event_dims=3)
    with pytest.raises(ValueError, match=r"f must keep x's leading \(point\) dims \(4,\)"):
        torchjac.jacobian(lambda x: x.sum(0), torch.randn(4, 3))
    with pytest.raises(ValueError, match="f must map d_in to d_in features"):
        torchjac.divergence(lambda x: x[..., :2], torch.randn(4, 3))
