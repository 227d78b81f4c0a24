"""torchjac.laplacian and torchjac.hessian against torch.func.hessian and nested create_graph autograd."""
import pytest
import torch
from torch import nn

import torchjac
from conftest import (ACTIVATIONS, assert_close32, assert_close64, autograd_hessian, oracle_hessian,
                      oracle_jacobian, replay_noise)

MODES = ("laplacian", "hessian", "hutchinson")


def _model(activation, d_in=3, d_out=3, cond_features=2, dtype=torch.float64):
    torch.manual_seed(0)
    f = torchjac.PointMLP(d_in, [12, 10, 8], d_out, activation=activation, cond_features=cond_features,
                          skip_layers=(2,)).to(dtype)
    if isinstance(activation, torchjac.Sine):  # SIREN-scale weights: keep sin(w0 z) away from aliasing
        with torch.no_grad():
            for p in f.parameters():
                p.mul_(0.5)
    return f


def _second_order(mode, f, x, cond, noise=None):
    """(y, out) of torchjac for mode; out from the same pass."""
    if mode == "hessian":
        return torchjac.hessian(f, x, cond=cond, return_output=True)
    if mode == "laplacian":
        return torchjac.laplacian(f, x, cond=cond, return_output=True)
    return torchjac.laplacian(f, x, cond=cond, estimator="hutchinson", noise=noise, return_output=True)


def _from_hessian(mode, hess, noise=None):
    """What mode computes, from each point's Hessian (..., d_out, d_in, d_in)."""
    if mode == "hessian":
        return hess
    if mode == "laplacian":
        return hess.diagonal(0, -2, -1).sum(-1)
    return torch.einsum("s...j,...ijk,s...k->...i", noise, hess, noise) / noise.shape[0]


@pytest.mark.parametrize("d_in,d_out", [(2, 1), (3, 1), (2, 3), (3, 3)])
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_values_equal_torch_func_hessian(name, d_in, d_out):
    f = _model(ACTIVATIONS[name], d_in, d_out)
    x = torch.randn(4, 5, d_in, dtype=torch.float64)
    cond = torch.randn(4, 1, 2, dtype=torch.float64)
    noise = torch.randn(3, 4, 5, d_in, dtype=torch.float64)
    y_expected, hess = oracle_hessian(f, x, cond)
    for mode in MODES:
        y, out = _second_order(mode, f, x, cond, noise)
        assert_close64(y, y_expected)
        assert_close64(out, _from_hessian(mode, hess, noise))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_training_gradients_equal_nested_autograd(name, mode):
    """One backward through torchjac's hand-written backward equals create_graph autograd's."""
    f = _model(ACTIVATIONS[name], d_out=1 if mode == "laplacian" else 3)
    x = torch.randn(2, 6, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 1, 2, dtype=torch.float64, requires_grad=True)
    noise = torch.randint(0, 2, (2, 2, 6, 3), dtype=torch.float64) * 2 - 1
    inputs = [x, cond, *f.parameters()]

    def loss(y, out):
        weights = torch.linspace(-1, 1, out[0, 0].numel(), dtype=torch.float64).view(out.shape[2:])
        return (y ** 2).sum() + (out * weights).sum() + (out ** 2).sum()

    y_expected, hess = autograd_hessian(f, x, cond)
    expected = torch.autograd.grad(loss(y_expected, _from_hessian(mode, hess, noise)), inputs, materialize_grads=True)
    actual = torch.autograd.grad(loss(*_second_order(mode, f, x, cond, noise)), inputs)
    for a, e in zip(actual, expected):
        assert_close64(a, e)


@pytest.mark.parametrize("mode", MODES)
def test_float32_against_the_float64_oracle(mode):
    f64 = _model(nn.Softplus(beta=10))
    f32 = _model(nn.Softplus(beta=10), dtype=torch.float32)
    x = torch.randn(300, 3, dtype=torch.float64)
    cond = torch.randn(300, 2, dtype=torch.float64)
    noise = torch.randn(2, 300, 3, dtype=torch.float64)
    _, hess = oracle_hessian(f64, x, cond)
    _, out = _second_order(mode, f32, x.float(), cond.float(), noise.float())
    assert_close32(out.double(), _from_hessian(mode, hess, noise))


def test_double_backward_by_finite_differences():
    """gradgradcheck of a loss on the Laplacian and the Hessian: a gradient penalty on top of a PINN loss."""
    f = _model(nn.Tanh(), d_out=2, cond_features=0)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    params = list(f.parameters())

    def loss(x, *values):
        with torch.nn.utils.stateless._reparametrize_module(f, dict(zip(dict(f.named_parameters()), values))):
            return torchjac.laplacian(f, x).pow(2).sum() + torchjac.hessian(f, x).sin().sum()

    assert torch.autograd.gradcheck(loss, (x, *params))
    assert torch.autograd.gradgradcheck(loss, (x, *params))


def test_hutchinson_reproducible_with_a_generator_and_replays_its_noise():
    f, x = _model(nn.Tanh(), cond_features=0), torch.randn(4, 5, 3, dtype=torch.float64)

    def draw(seed, noise="rademacher"):
        return torchjac.laplacian(f, x, estimator="hutchinson", num_samples=3, noise=noise,
                                  generator=torch.Generator().manual_seed(seed))

    assert torch.equal(draw(7), draw(7))
    assert not torch.equal(draw(7), draw(8))
    for noise in ("rademacher", "gaussian"):
        e = replay_noise(noise, (4, 5, 3, 3), seed=3)
        _, hess = oracle_hessian(f, x)
        assert_close64(draw(3, noise), _from_hessian("hutchinson", hess, e.movedim(-2, 0)))


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_hutchinson_is_unbiased_within_a_statistical_bound(noise):
    """The mean of S samples lies within 5 standard errors of the exact Laplacian, for every output.

    For a symmetric H, Var(e^T H e) is 2 sum_{j != k} H_jk^2 for Rademacher noise and 2 ||H||_F^2 for
    Gaussian noise. With 12 points and 3 outputs the chance that any one falls outside 5 sigma is below 1e-5.
    """
    f, x = _model(nn.Tanh(), cond_features=0), torch.randn(12, 3, dtype=torch.float64)
    samples = 20000
    est = torchjac.laplacian(f, x, estimator="hutchinson", num_samples=samples, noise=noise,
                             generator=torch.Generator().manual_seed(11))
    _, hess = oracle_hessian(f, x)
    squares = hess ** 2
    if noise == "rademacher":
        squares = squares - torch.diag_embed(squares.diagonal(0, -2, -1))
    std_error = (2 * squares.sum((-2, -1)) / samples).sqrt()
    deviation = (est - hess.diagonal(0, -2, -1).sum(-1)).abs()
    assert (deviation <= 5 * std_error).all(), (deviation / std_error).max()


class _Normalized(nn.Module):
    """Not an MLP chain: the generic path computes it."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(3, 16), nn.SiLU(), nn.Linear(16, 2))

    def forward(self, x):
        return self.net(x) * torch.sigmoid(x.norm(dim=-1, keepdim=True))


@pytest.mark.parametrize("mode", MODES)
def test_generic_path_values_and_training(mode):
    f = _Normalized().double()
    assert torchjac.explain(f).path == "generic"
    x = torch.randn(3, 4, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randn(2, 3, 4, 3, dtype=torch.float64)
    y_expected, hess = autograd_hessian(f, x)
    y, out = _second_order(mode, f, x, None, noise)
    expected = _from_hessian(mode, hess, noise)
    assert_close64(y, y_expected)
    assert_close64(out, expected)
    params = [x, *f.parameters()]
    for a, e in zip(torch.autograd.grad(out.pow(2).sum(), params), torch.autograd.grad(expected.pow(2).sum(), params)):
        assert_close64(a, e)


def test_event_dims_sum_over_every_entry_of_a_point():
    """A point of shape (2, 3): the Laplacian sums the 6 second derivatives of each output entry."""
    net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    f = lambda p: net(p) * p.sum((-2, -1), keepdim=True)  # noqa: E731  (mixes the entries within a point)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    hess = torch.func.vmap(torch.func.hessian(f))(x)  # (5, 2, 3, 2, 3)
    assert_close64(torchjac.hessian(f, x, event_dims=2), hess)
    assert_close64(torchjac.laplacian(f, x, event_dims=2), hess.reshape(5, 2, 3, 6, 6).diagonal(0, -2, -1).sum(-1))


def test_non_finite_points_give_nan_and_leave_the_others_alone():
    for f in (_model(nn.Tanh(), cond_features=0), _Normalized().double()):
        x = torch.randn(4, 3, dtype=torch.float64)
        x[1, 0], x[2, 2] = float("inf"), float("nan")
        _, hess = oracle_hessian(f, x[[0, 3]])
        for out, expected in ((torchjac.hessian(f, x), hess), (torchjac.laplacian(f, x), _from_hessian("laplacian", hess))):
            assert out[[1, 2]].isnan().all()
            assert_close64(out[[0, 3]], expected)


def test_conv1d_stack_laplacian_is_shaped_like_its_output():
    f = nn.Sequential(nn.Conv1d(3, 16, 1), nn.Softplus(), nn.Conv1d(16, 4, 1)).double()
    x = torch.randn(2, 3, 7, dtype=torch.float64)
    points = nn.Sequential(nn.Linear(3, 16), nn.Softplus(), nn.Linear(16, 4)).double()
    for linear, conv in zip(points[::2], f[::2]):
        linear.weight.data, linear.bias.data = conv.weight.data[..., 0], conv.bias.data
    _, hess = oracle_hessian(points, x.movedim(1, 2))
    y, lap = torchjac.laplacian(f, x, return_output=True)
    assert lap.shape == y.shape == (2, 4, 7)
    assert_close64(lap, _from_hessian("laplacian", hess).movedim(2, 1))
    assert_close64(torchjac.hessian(f, x), hess)


def test_fused_path_takes_every_supported_model_kind():
    """A Sequential, a reused activation and a traced module run the fused ops, with values from them."""
    act = nn.Softplus(beta=5)
    seq = nn.Sequential(nn.Linear(3, 16), act, nn.Linear(16, 16), act, nn.Linear(16, 1)).double()

    class Traced(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 16), nn.Linear(16, 1)

        def forward(self, x):
            return self.b(torch.tanh(self.a(x)))

    x = torch.randn(20, 3, dtype=torch.float64)
    for f in (seq, Traced().double()):
        assert torchjac.explain(f).path == "fused"
        _, hess = oracle_hessian(f, x)
        assert_close64(torchjac.laplacian(f, x), _from_hessian("laplacian", hess))
        assert_close64(torchjac.hessian(f, x), hess)


def test_errors_name_the_argument():
    f, x = _model(nn.Tanh(), cond_features=0), torch.randn(4, 3, dtype=torch.float64)
    cases = [
        (dict(estimator="stochastic"), "torchjac.laplacian: estimator expected one of"),
        (dict(estimator="hutchinson", noise="uniform"), "noise expected one of"),
        (dict(estimator="hutchinson", num_samples=0), "num_samples expected a positive int"),
        (dict(noise=torch.ones(4, 3, dtype=torch.float64)), "only used with estimator=\"hutchinson\""),
        (dict(estimator="hutchinson", noise=torch.ones(4, 2, dtype=torch.float64)), "noise expected shape"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message.replace("(", r"\(")):
            torchjac.laplacian(f, x, **kwargs)
    with pytest.raises(ValueError, match="torchjac.hessian: x expected last dim 3"):
        torchjac.hessian(f, torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="torchjac.mlp_laplacian: weights"):
        torch.ops.torchjac.mlp_laplacian(x, x[:, :0], [torch.ones(2, 4, dtype=torch.float64)],
                                         [torch.ones(2, dtype=torch.float64)], [0], [0.0, 0.0], [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", MODES)
def test_cuda_equals_cpu(mode):
    """The fused forward kernel (the pure-PyTorch path for the backward) against the CPU, values and gradients."""
    f = _model(nn.Softplus(beta=10))
    x, cond = torch.randn(64, 3, dtype=torch.float64), torch.randn(64, 2, dtype=torch.float64)
    noise = torch.randn(2, 64, 3, dtype=torch.float64)
    expected = _second_order(mode, f, x, cond, noise)
    expected_grads = torch.autograd.grad(expected[1].pow(2).sum(), list(f.parameters()))
    f_cuda = f.cuda()
    actual = _second_order(mode, f_cuda, x.cuda(), cond.cuda(), noise.cuda())
    actual_grads = torch.autograd.grad(actual[1].pow(2).sum(), list(f_cuda.parameters()))
    for a, e in zip(list(actual) + list(actual_grads), list(expected) + list(expected_grads)):
        assert_close64(a.cpu(), e)


def test_pinn_training_step_compiles_fullgraph_and_equals_eager():
    """A Poisson residual loss: one backward, compiled with fullgraph=True."""
    f = _model(nn.Tanh(), d_out=1, cond_features=0)
    x = torch.randn(64, 3, dtype=torch.float64, requires_grad=True)

    def loss_fn(x):
        u, lap = torchjac.laplacian(f, x, return_output=True)
        return ((lap + 3 * torch.sin(x).prod(-1, keepdim=True)) ** 2).mean() + (u ** 2).mean()

    def grads(fn):
        f.zero_grad()
        x.grad = None
        fn(x).backward()
        return [x.grad.clone()] + [p.grad.clone() for p in f.parameters()]

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    for a, e in zip(grads(compiled), grads(loss_fn)):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


def test_generic_path_without_grad_and_with_a_broadcast_cond():
    """The generic Hessian's Jacobian of the Jacobian takes JVPs without autograd; x broadcast against cond is an
    expanded view, which those JVPs once refused to write into."""
    net = torchjac.PointMLP(3, [8], 2, cond_features=2).double()
    f = lambda x, c: net(x, c) * torch.sigmoid(x.norm(dim=-1, keepdim=True))  # noqa: E731
    x, cond = torch.randn(5, 3, dtype=torch.float64), torch.randn(4, 1, 2, dtype=torch.float64)
    _, hess = oracle_hessian(f, x, cond)
    with torch.no_grad():
        assert_close64(torchjac.hessian(f, x, cond=cond), hess)
        assert_close64(torchjac.laplacian(f, x, cond=cond), _from_hessian("laplacian", hess))
        wide = lambda x, c: f(x, c).repeat_interleave(2, -1)  # noqa: E731  (d_out 4 > d_in 3: JVPs)
        assert_close64(torchjac.jacobian(wide, x, cond=cond), oracle_jacobian(wide, x, cond)[1])


def test_generic_hutchinson_with_many_samples_equals_the_contracted_hessian():
    f, x = _Normalized().double(), torch.randn(6, 3, dtype=torch.float64)
    noise = torch.randn(5, 6, 3, dtype=torch.float64)  # S >= d_in: from the whole Hessian
    _, hess = oracle_hessian(f, x)
    assert_close64(torchjac.laplacian(f, x, estimator="hutchinson", noise=noise), _from_hessian("hutchinson", hess, noise))


def test_a_noise_tensor_without_samples_is_refused():
    f, x = _model(nn.Tanh(), cond_features=0), torch.randn(4, 3, dtype=torch.float64)
    for fn in (torchjac.laplacian, torchjac.divergence):
        with pytest.raises(ValueError, match="noise expected at least one sample"):
            fn(f, x, estimator="hutchinson", noise=torch.ones(0, 4, 3, dtype=torch.float64))
