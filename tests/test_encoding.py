"""Models with a frequency (positional) encoding of x, and models that return slices of their last layer.

The fused path composes the MLP ops with the encoding (torchjac/encoding.py). Everything is checked against
torch.func (vmap(jacrev), hessian) and the create_graph autograd loop in float64, never against torchjac.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

import torchjac
from conftest import assert_close64, autograd_jacobian, oracle_hessian, oracle_jacobian
from ops_seen import ops_seen
from torchjac.encoding import FrequencyEncoding

F64 = torch.float64


class Embedder:
    """NeRF's embedder as NeRF, NeuS and IDR write it: a plain object looping over frequency bands (tensors)."""

    def __init__(self, n_freqs, include_input=True, log_sampling=True, pi=False):
        top = n_freqs - 1
        bands = 2.0 ** torch.linspace(0.0, top, n_freqs) if log_sampling else torch.linspace(1.0, 2.0 ** top, n_freqs)
        self.bands = bands * math.pi if pi else bands
        self.include_input = include_input

    def __call__(self, x):
        parts = [x] if self.include_input else []
        for freq in self.bands:
            for fn in (torch.sin, torch.cos):
                parts.append(fn(x * freq))
        return torch.cat(parts, -1)


class EncodedField(nn.Module):
    """encoding -> Softplus MLP with a skip that reads the encoded input (NeuS, IDR, NeRF's trunk)."""

    def __init__(self, d_out=3, width=16, n_freqs=3, skip=True, input_scale=1.0, act=None, **embedder):
        super().__init__()
        self.embed = Embedder(n_freqs, **embedder)
        n_embed = 3 * (int(embedder.get("include_input", True)) + 2 * n_freqs)
        self.input_scale, self.skip = input_scale, skip
        self.l0 = nn.Linear(n_embed, width)
        self.l1 = nn.Linear(width + (n_embed if skip else 0), width)
        self.l2 = nn.Linear(width, d_out)
        self.act = act or nn.Softplus(beta=10.0)

    def forward(self, x):
        e = self.embed(x * self.input_scale)
        h = self.act(self.l0(e))
        if self.skip:
            h = torch.cat([h, e], 1) / math.sqrt(2)  # dim 1 of 2-D points, as NeuS writes it
        return self.l2(self.act(self.l1(h)))


class FloatBands(nn.Module):
    """Frequencies as Python floats and as a plain tensor attribute (neither a parameter nor a buffer)."""

    def __init__(self):
        super().__init__()
        self.bands = torch.tensor([1.0, 3.0])
        self.l0 = nn.Linear(3 * 5, 16)
        self.l1 = nn.Linear(16, 1)

    def forward(self, x):
        e = torch.cat([torch.sin(0.5 * x)] + [torch.cos(x * b) for b in self.bands] + [torch.sin(x * 2.0),
                                                                                     torch.sin(x / 4)], -1)
        return self.l1(torch.tanh(self.l0(e)))


def _perturbed(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.double()


def _points(n=20, scale=0.6):
    torch.manual_seed(2)
    return (scale * torch.randn(n, 3, dtype=F64)).requires_grad_(True)


MODELS = {
    "log_bands": lambda: EncodedField(),
    "without_input": lambda: EncodedField(include_input=False),
    "linear_bands_pi": lambda: EncodedField(log_sampling=False, pi=True),
    "no_skip_scalar": lambda: EncodedField(d_out=1, skip=False),
    "scaled_input_scalar": lambda: EncodedField(d_out=1, input_scale=1.7),
    "relu": lambda: EncodedField(act=nn.ReLU()),
    "float_bands": FloatBands,
}


@pytest.fixture(params=sorted(MODELS))
def model(request):
    return _perturbed(MODELS[request.param]())


def test_encoded_models_run_fused(model):
    why = torchjac.explain(model)
    assert why.path == "fused" and "frequency encoding" in why.detail, why
    with ops_seen() as seen, torch.no_grad():
        torchjac.jacobian(model, _points())
    assert seen & {"torchjac.mlp_jvp", "torchjac.mlp_jacobian_reverse"}


def test_jacobian_matches_the_oracle(model):
    x = _points()
    y, jac = torchjac.jacobian(model, x, return_output=True)
    y_ref, jac_ref = oracle_jacobian(model, x)
    assert_close64(y, y_ref)
    assert_close64(jac, jac_ref)


def test_training_gradients_match_create_graph(model):
    """An eikonal-style loss on J (and y): gradients w.r.t. every parameter and x."""
    x = _points()
    leaves = [x] + list(model.parameters())

    def loss(y, jac):
        return ((jac.norm(dim=-1) - 1) ** 2).mean() + (y ** 2).mean()

    expected = torch.autograd.grad(loss(*autograd_jacobian(model, x)), leaves)
    got = torch.autograd.grad(loss(*torchjac.jacobian(model, x, return_output=True)), leaves)
    for g, e in zip(got, expected):
        assert e.abs().max() > 0
        assert_close64(g, e)


def test_double_backward_through_the_encoding():
    """The gradient of the loss's gradient w.r.t. x, as a second-order training term would take it."""
    model = _perturbed(EncodedField(d_out=1))
    x = _points(8)

    def loss_grad(jac_fn):
        g = torch.autograd.grad((jac_fn(x) ** 2).sum(), x, create_graph=True)[0]
        params = list(model.parameters())
        grads = torch.autograd.grad((g ** 2).sum(), params, allow_unused=True)  # J does not read the last bias
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]

    expected = loss_grad(lambda p: autograd_jacobian(model, p)[1])
    for g, e in zip(loss_grad(lambda p: torchjac.jacobian(model, p)), expected):
        assert_close64(g, e)


def test_divergence_jvp_and_hutchinson():
    model = _perturbed(EncodedField(d_out=3))
    x = _points()
    _, jac = oracle_jacobian(model, x)
    assert_close64(torchjac.divergence(model, x), jac.diagonal(0, -2, -1).sum(-1))
    v = torch.randn(20, 3, dtype=F64)
    assert_close64(torchjac.jvp(model, x, v), torch.einsum("pij,pj->pi", jac, v))
    noise = torch.randint(0, 2, (4, 20, 3), dtype=F64) * 2 - 1
    expected = torch.einsum("spi,pij,spj->p", noise, jac, noise) / 4
    assert_close64(torchjac.divergence(model, x, estimator="hutchinson", noise=noise), expected)


def test_second_order_of_an_encoded_model_is_exact_on_the_generic_path():
    model = _perturbed(EncodedField(d_out=1))
    x = _points(6)
    _, hess = oracle_hessian(model, x)
    with ops_seen() as seen:
        got = torchjac.hessian(model, x)
        lap = torchjac.laplacian(model, x)
    assert not seen & {"torchjac.mlp_hessian", "torchjac.mlp_laplacian"}
    assert_close64(got, hess)
    assert_close64(lap, hess.diagonal(0, -2, -1).sum(-1))
    assert "laplacian and hessian on the generic path" in torchjac.explain(model).detail


def test_float32_matches_float64():
    model = _perturbed(EncodedField(d_out=1, input_scale=1.5))
    x = _points().detach()
    _, jac64 = oracle_jacobian(model, x)
    jac32 = torchjac.jacobian(model.float(), x.float())
    torch.testing.assert_close(jac32, jac64.float(), rtol=1e-4, atol=1e-5)


def test_encoding_derivatives_match_autograd():
    enc = FrequencyEncoding((("x", 1.0), ("sin", 2.0), ("cos", 2.0), ("sin", 0.3 * math.pi)))
    x = torch.randn(5, 3, dtype=F64)
    jac = vmap(jacrev(enc.value))(x)  # (5, 12, 3)
    v = torch.randn(5, 2, 3, dtype=F64)
    assert_close64(enc.push(x, v), torch.einsum("pej,pkj->pke", jac, v))
    g = torch.randn(5, 4, 12, dtype=F64)
    assert_close64(enc.pull(x, g), g @ jac)


# ---- recognition

def test_recognizing_leaves_the_module_as_it_was():
    """torch.fx assigns the tensor constants it meets to the module; they must not pile up call after call."""
    model = _perturbed(EncodedField())
    before = set(vars(model))
    for _ in range(3):
        torchjac.jacobian(model, _points())
        torchjac.explain(model)
    assert set(vars(model)) == before


def test_cat_along_dim_1_is_the_feature_dim_of_2d_points_only():
    """EncodedField concatenates along dim 1: for (B, N, 3) points that is N, and the model computes
    something else, so the fused path must not run."""
    model = _perturbed(EncodedField(skip=True))
    assert torchjac.explain(model, ndim=3).path == "generic"
    assert "torch.cat along dim 1 of 3-dim x" in torchjac.explain(model, ndim=3).detail
    x = _points(8).detach().view(2, 4, 3)
    with ops_seen() as seen:
        try:
            torchjac.jacobian(model, x)
        except Exception:
            pass  # the model itself cannot take (B, N, 3) points; the generic path calls it as written
    assert not seen & {"torchjac.mlp_jvp", "torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}


def test_trainable_frequencies_are_not_baked_in():
    class LearnedBands(nn.Module):
        def __init__(self):
            super().__init__()
            self.freq = nn.Parameter(torch.tensor(2.0))
            self.lin = nn.Linear(3, 1)

        def forward(self, x):
            return self.lin(torch.sin(x * self.freq))

    model = LearnedBands().double()
    why = torchjac.explain(model)
    assert why.path == "generic" and "by the parameter 'freq'" in why.detail
    x = _points(5)
    assert_close64(torchjac.jacobian(model, x), oracle_jacobian(model, x)[1])


def test_encoding_of_cond_is_not_fused():
    class ViewEncoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 + 6, 2)

        def forward(self, x, d):
            return self.lin(torch.cat([x, torch.sin(d), torch.cos(d)], -1))

    why = torchjac.explain(ViewEncoded(), cond=True)
    assert why.path == "generic" and "a tensor computed from cond (an encoding of cond, say)" in why.detail


# ---- the output: slices of the last layer

class SdfAndFeatures(nn.Module):
    """NeuS's output: [sdf / scale, features] from one last layer."""

    def __init__(self, scale=2.0, sdf_only=False, activate=False):
        super().__init__()
        self.scale, self.sdf_only, self.activate = scale, sdf_only, activate
        self.l0 = nn.Linear(3, 16)
        self.l1 = nn.Linear(16, 5)

    def forward(self, x):
        out = self.l1(F.softplus(self.l0(x), beta=20.0))
        if self.activate:
            out = torch.sigmoid(out)
        if self.sdf_only:
            return out[..., :1] / self.scale
        return torch.cat([out[:, :1] / self.scale, out[:, 1:]], -1)


@pytest.mark.parametrize("sdf_only", [False, True])
def test_output_slices_fold_into_the_last_layer(sdf_only):
    model = _perturbed(SdfAndFeatures(sdf_only=sdf_only))
    why = torchjac.explain(model)
    assert why.path == "fused" and ("output features [0]" if sdf_only else "output features [0, 1, 2, 3, 4]") in why.detail
    x = _points()
    y, jac = torchjac.jacobian(model, x, return_output=True)
    y_ref, jac_ref = oracle_jacobian(model, x)
    assert_close64(y, y_ref)
    assert_close64(jac, jac_ref)
    leaves = list(model.parameters())

    def loss(y, jac):
        return (jac ** 2).sum() + (y ** 2).sum()

    expected = torch.autograd.grad(loss(*autograd_jacobian(model, x)), leaves)
    for g, e in zip(torch.autograd.grad(loss(y, jac), leaves), expected):
        assert_close64(g, e)


def test_scaled_slices_after_a_nonlinear_activation_are_not_folded():
    model = _perturbed(SdfAndFeatures(activate=True))
    why = torchjac.explain(model)
    assert why.path == "generic" and "scaled after a nonlinear activation" in why.detail
    x = _points(6)
    assert_close64(torchjac.jacobian(model, x), oracle_jacobian(model, x)[1])


def test_specialized_arguments_and_their_guards():
    """IDR's forward(input, compute_grad=False): torch.fx guards the specialized argument; the guard is no
    part of the chain, and the argument is not taken for cond."""
    class WithFlag(nn.Module):
        def __init__(self):
            super().__init__()
            self.l0, self.l1 = nn.Linear(3, 8), nn.Linear(8, 2)

        def forward(self, x, compute_grad=False, params=None, **kwargs):
            return self.l1(torch.tanh(self.l0(x)))

    model = _perturbed(WithFlag())
    assert torchjac.explain(model).path == "fused"
    x = _points(6)
    assert_close64(torchjac.jacobian(model, x), oracle_jacobian(model, x)[1])


# ---- outputs=: the Jacobian of some output features only

def _neus_like():
    return _perturbed(EncodedField(d_out=5))


@pytest.mark.parametrize("outputs", [slice(0, 1), [0], (4, 0), slice(1, None)])
def test_outputs_selects_rows_of_the_jacobian(outputs):
    model = _neus_like()
    x = _points()
    y_ref, jac_ref = oracle_jacobian(model, x)
    rows = list(range(5))[outputs] if isinstance(outputs, slice) else list(outputs)
    with ops_seen() as seen:
        y, jac = torchjac.jacobian(model, x, outputs=outputs, return_output=True)
    assert_close64(y, y_ref[:, rows])  # those outputs of f(x), from the same pass
    assert_close64(jac, jac_ref[:, rows])
    if len(rows) < 3:  # fewer outputs than inputs: the reverse direction
        assert "torchjac.mlp_jacobian_reverse" in seen
    leaves = [x] + list(model.parameters())

    def loss(y, jac):
        return ((jac.norm(dim=-1) - 1) ** 2).mean() + (y ** 2).mean()

    expected = torch.autograd.grad(loss(y_ref[:, rows], autograd_jacobian(model, x)[1][:, rows]), leaves)
    for g, e in zip(torch.autograd.grad(loss(y, jac), leaves), expected):
        assert_close64(g, e)


def test_outputs_on_the_generic_path():
    f = lambda p: torch.cat([p.sin().sum(-1, keepdim=True), p ** 2], -1)  # noqa: E731
    x = _points(6)
    y, jac = torchjac.jacobian(f, x, outputs=slice(0, 1), return_output=True)
    y_ref, jac_ref = oracle_jacobian(f, x)
    assert_close64(y, y_ref[:, :1])
    assert_close64(jac, jac_ref[:, :1])


@pytest.mark.parametrize("outputs, error, match", [
    (slice(7, 9), ValueError, "selects none of f's 5 output features"),
    ([5], ValueError, "expected indices of f's 5 output features"),
    (0, TypeError, "outputs expected a slice or a sequence of ints"),
])
def test_outputs_errors(outputs, error, match):
    with pytest.raises(error, match=match):
        torchjac.jacobian(_neus_like(), _points(4), outputs=outputs)


def test_outputs_of_a_plain_sequential_in_both_directions():
    model = _perturbed(nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 6)))
    x = _points(7)
    y_ref, jac_ref = oracle_jacobian(model, x)
    for outputs in (slice(0, 1), slice(0, 5)):
        y, jac = torchjac.jacobian(model, x, outputs=outputs, return_output=True)
        assert_close64(y, y_ref[:, outputs])
        assert_close64(jac, jac_ref[:, outputs])


def test_a_single_point_and_no_points():
    """x of shape (d_in,) (found by the fuzzer: the forward modes' reshape had no leading dims) and (0, d_in)."""
    model = _perturbed(EncodedField(d_out=3, skip=False))  # its skip concatenates along dim 1 of (P, d_in)
    point = _points(1)[0]
    _, jac_ref = oracle_jacobian(model, point[None])
    assert_close64(torchjac.jacobian(model, point), jac_ref[0])
    assert_close64(torchjac.divergence(model, point), jac_ref[0].trace())
    assert torchjac.jacobian(model, torch.zeros(0, 3, dtype=F64)).shape == (0, 3, 3)


@pytest.mark.parametrize("style", ["old", "new"])
def test_neus_with_either_weight_norm(style):
    """NeuS as published uses the older torch.nn.utils.weight_norm; the parametrization is its successor."""
    import zoo
    torch.manual_seed(8)
    model = zoo.NeuSSDFNetwork(multires=6, width=48, weight_norm=style == "old", scale=1.3)
    if style == "new":
        for name, m in list(model.named_children()):
            if isinstance(m, nn.Linear):
                nn.utils.parametrizations.weight_norm(m)
    model = _perturbed(model)
    assert torchjac.explain(model).path == "fused"
    x = _points(10, 0.4)
    y, jac = torchjac.jacobian(model, x, outputs=slice(0, 1), return_output=True)
    y_ref, jac_ref = oracle_jacobian(model, x)
    assert_close64(y, y_ref[:, :1])
    assert_close64(jac, jac_ref[:, :1])
    leaves = [x, *model.parameters()]

    def loss(y, jac):
        return ((jac.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()

    expected = torch.autograd.grad(loss(y_ref[:, :1], autograd_jacobian(model, x)[1][:, :1]), leaves)
    for g, e in zip(torch.autograd.grad(loss(y, jac), leaves), expected):
        assert_close64(g, e)
