"""Everyday PyTorch idioms: each used to give a silently wrong result or a crash.

Reused modules, Sequential subclasses, the older weight_norm, torch.func
transforms over torchjac, torch.compile on every path, and the errors a user
meets first. Every value is checked against torch.func or create_graph autograd.
"""
import math
import types
import warnings

import pytest
import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch.func import hessian, jacrev, vmap

import torchjac
from conftest import assert_close64, autograd_jacobian, oracle_jacobian
from ops_seen import ops_seen

F64 = torch.float64


def _points(n=7, d=3, requires_grad=False):
    return torch.randn(n, d, dtype=F64, requires_grad=requires_grad)


def old_weight_norm(module):
    with warnings.catch_warnings():  # deprecated, but NeuS, IDR and DeepSDF use it
        warnings.simplefilter("ignore", FutureWarning)
        return nn.utils.weight_norm(module)


def _check_values(f, x, cond=None):
    # torchjac first: calling the model refreshes state (the older weight_norm's weight) it must not rely on
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    y_ref, jac_ref = oracle_jacobian(f, x, cond)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)
    return jac_ref


def _grads(loss, leaves):
    """Gradients, zeros for a leaf the loss does not reach."""
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]


def _check_training_grads(f, x, cond=None):
    leaves = [x] + ([cond] if cond is not None else []) + list(f.parameters())
    _, jac_ref = autograd_jacobian(f, x, cond)
    expected = _grads((jac_ref ** 2).sum() + jac_ref.sum(-1).pow(3).sum(), leaves)
    jac = torchjac.jacobian(f, x, cond=cond)
    actual = _grads((jac ** 2).sum() + jac.sum(-1).pow(3).sum(), leaves)
    for a, e in zip(actual, expected):
        assert_close64(a, e)


# ---- 1. a module used twice in an nn.Sequential

def test_reused_activation_instance():
    a = nn.Tanh()
    f = nn.Sequential(nn.Linear(3, 16), a, nn.Linear(16, 16), a, nn.Linear(16, 3)).double()
    assert torchjac.explain(f).path == "fused"
    x = _points(requires_grad=True)
    _check_values(f, x.detach())
    _check_training_grads(f, x)


def test_tied_linear_used_twice():
    tied = nn.Linear(8, 8)
    f = nn.Sequential(nn.Linear(3, 8), nn.SiLU(), tied, nn.SiLU(), tied, nn.SiLU(), nn.Linear(8, 3)).double()
    x = _points(requires_grad=True)
    with ops_seen() as seen:
        _check_values(f, x.detach())
    assert seen & {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}
    _check_training_grads(f, x)


def test_nested_sequential_reused():
    block = nn.Sequential(nn.Linear(8, 8), nn.Softplus(beta=2.0))
    f = nn.Sequential(nn.Linear(3, 8), nn.Softplus(beta=2.0), block, block, nn.Linear(8, 2)).double()
    assert torchjac.explain(f).path == "fused"
    _check_values(f, _points())


# ---- 2. nn.Sequential subclasses

class Residual(nn.Sequential):
    def forward(self, x):
        return x + super().forward(x)


class MetaStyleSequential(nn.Sequential):
    """Like torchmeta's MetaSequential: forward takes optional replacement parameters."""

    def forward(self, inp, params=None):
        for name, m in self._modules.items():
            if params is not None and isinstance(m, nn.Linear):
                inp = nn.functional.linear(inp, params[f"{name}.weight"], params[f"{name}.bias"])
            else:
                inp = m(inp)
        return inp


class PlainSubclass(nn.Sequential):
    """A subclass that keeps nn.Sequential's forward."""


def test_residual_sequential_subclass():
    f = Residual(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    assert torchjac.explain(f).path == "generic"
    x = _points(requires_grad=True)
    _check_values(f, x.detach())
    _check_training_grads(f, x)
    assert_close64(torchjac.divergence(f, x), oracle_jacobian(f, x.detach())[1].diagonal(0, -2, -1).sum(-1))


def test_meta_style_sequential_subclass():
    f = MetaStyleSequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    # torchjac calls f(x): with params=None (a guard torch.fx puts in the trace) the forward is the chain
    assert torchjac.explain(f).path == "fused"
    x = _points(requires_grad=True)
    _check_values(f, x.detach())
    _check_training_grads(f, x)


def test_sequential_subclass_without_forward_is_fused():
    a = nn.ELU()
    f = PlainSubclass(nn.Linear(3, 8), a, nn.Linear(8, 8), a, nn.Linear(8, 3)).double()
    assert torchjac.explain(f).path == "fused"
    _check_values(f, _points())


def test_sequential_subclass_recognized_with_cond():
    class Scaled(nn.Sequential):
        def forward(self, h):
            return super().forward(h) * 0.5

    f = Scaled(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    assert torchjac.explain(f).path == "fused"
    x, cond = _points(), torch.randn(7, 2, dtype=F64)
    with ops_seen() as seen:
        _check_values(f, x, cond)
    assert seen & {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}


class DoubledLinear(nn.Linear):
    def forward(self, x):
        return 2 * super().forward(x)


class SteeperTanh(nn.Tanh):
    def forward(self, x):
        return torch.tanh(2 * x)


class Reversed(nn.Sequential):
    """Keeps nn.Sequential.forward, but iterates backwards: forward follows the iteration."""

    def __iter__(self):
        return iter(list(self._modules.values())[::-1])


class ResidualPointMLP(torchjac.PointMLP):
    def forward(self, x, cond=None):
        return super().forward(x, cond) + x


class SelfTracedModel(nn.Module):
    """A user module, traced by torch.fx, whose layer is a parametrized Linear subclass."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.parametrizations.weight_norm(DoubledLinear(3, 8))
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _subclassed_models():
    torch.manual_seed(0)
    return {
        "linear_subclass": nn.Sequential(DoubledLinear(3, 8), nn.Tanh(), nn.Linear(8, 3)),
        "activation_subclass": nn.Sequential(nn.Linear(3, 8), SteeperTanh(), nn.Linear(8, 3)),
        "reversed_iteration": Reversed(nn.Linear(8, 3), nn.Tanh(), nn.Linear(3, 8)),
        "point_mlp_subclass": ResidualPointMLP(3, [8, 8], 3),
        "parametrized_subclass_in_traced_module": SelfTracedModel(),
    }


@pytest.mark.parametrize("name", sorted(_subclassed_models()))
def test_subclasses_with_their_own_forward_are_computed_as_written(name):
    f = _subclassed_models()[name].double()
    _check_values(f, _points())


def test_sequential_subclass_taking_cond_is_refused_with_cond():
    class CondSequential(nn.Sequential):
        def forward(self, x, cond=None):
            return super().forward(x if cond is None else torch.cat([x, cond], -1))

    f = CondSequential(nn.Linear(5, 3)).double()
    with pytest.raises(ValueError, match=r"takes a second input.*lambda x, cond: model\(x, cond\)"):
        torchjac.jacobian(f, _points(), cond=torch.randn(7, 2, dtype=F64))
    _check_values(lambda x, c: f(x, c), _points(), torch.randn(7, 2, dtype=F64))


def test_conv1d_outside_a_sequential_is_refused():
    class PointNetBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(3, 3, 1)

        def forward(self, x):
            return torch.tanh(self.conv(x))

    with pytest.raises(ValueError, match=r"module 'conv' \(Conv1d\).*mixes dim 1"):
        torchjac.jacobian(PointNetBlock().double(), torch.randn(2, 3, 5, dtype=F64))
    inside = nn.Sequential(Residual(nn.Conv1d(3, 3, 1), nn.Tanh()), nn.Tanh()).double()
    with pytest.raises(ValueError, match="no generic fallback"):
        torchjac.jacobian(inside, torch.randn(2, 3, 5, dtype=F64))


def test_forward_hooks_take_the_generic_path():
    f = _square_model()
    f[1].register_forward_hook(lambda module, inputs, output: 0.5 * output)
    assert torchjac.explain(f).path == "generic" and "hooks" in torchjac.explain(f).detail
    x = _points(requires_grad=True)
    _check_values(f, x.detach())
    _check_training_grads(f, x)


# ---- 3. the older torch.nn.utils.weight_norm

def _old_weight_norm_model():
    torch.manual_seed(0)
    return nn.Sequential(old_weight_norm(nn.Linear(3, 16)), nn.Softplus(beta=100),
                         old_weight_norm(nn.Linear(16, 3))).double()


def test_old_weight_norm_reads_current_g_and_v():
    lin = old_weight_norm(nn.Linear(3, 3, bias=False))
    f = nn.Sequential(lin)
    with torch.no_grad():
        lin.weight_g.mul_(2)  # .weight is refreshed only by the next forward
    x = _points().float()
    torch.testing.assert_close(torchjac.jacobian(f, x), vmap(jacrev(f))(x))


def test_old_weight_norm_after_double_and_load_state_dict():
    f = _old_weight_norm_model()  # .double() does not convert the stale plain .weight
    other = _old_weight_norm_model()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(torch.randn_like(p))
    f.load_state_dict(other.state_dict())
    _check_values(f, _points())


def test_old_weight_norm_trains_over_steps():
    f = _old_weight_norm_model()
    twin = _old_weight_norm_model()
    opt, opt_twin = torch.optim.SGD(f.parameters(), 0.05), torch.optim.SGD(twin.parameters(), 0.05)
    x = _points()
    for _ in range(3):
        for model, optimizer, jac_fn in ((f, opt, lambda m: torchjac.jacobian(m, x)),
                                         (twin, opt_twin, lambda m: autograd_jacobian(m, x.requires_grad_())[1])):
            optimizer.zero_grad()
            (jac_fn(model) ** 2).sum().backward()
            optimizer.step()
        assert f[0].weight_g.grad is not None and f[0].weight_v.grad is not None
        for p, q in zip(f.parameters(), twin.parameters()):
            grad_q = torch.zeros_like(q) if q.grad is None else q.grad  # J does not read the last bias
            assert_close64(p.grad, grad_q)
            assert_close64(p, q)


# ---- 4. torch.func over torchjac

def _square_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def _oracle_div(f):
    return lambda x: vmap(jacrev(f))(x).diagonal(0, -2, -1).sum(-1)


CALLS = {
    "jacobian": (lambda f: lambda x: torchjac.jacobian(f, x), lambda f: lambda x: vmap(jacrev(f))(x)),
    "divergence": (lambda f: lambda x: torchjac.divergence(f, x), _oracle_div),
    "jvp": (lambda f: lambda x: torchjac.jvp(f, x, torch.ones_like(x)),
            lambda f: lambda x: (vmap(jacrev(f))(x) @ torch.ones_like(x).unsqueeze(-1)).squeeze(-1)),
}


@pytest.mark.parametrize("call", sorted(CALLS))
def test_func_jvp_over_torchjac(call):
    f = _square_model()
    ours, oracle = (make(f) for make in CALLS[call])
    x, v = _points(), _points()
    y, tangent = torch.func.jvp(ours, (x,), (v,))
    y_ref, tangent_ref = torch.func.jvp(oracle, (x,), (v,))
    assert tangent_ref.abs().max() > 1e-3  # a zero tangent would otherwise pass
    assert_close64(y, y_ref)
    assert_close64(tangent, tangent_ref)


@pytest.mark.parametrize("call", sorted(CALLS))
def test_func_vjp_grad_and_vmap_over_torchjac(call):
    f = _square_model()
    ours, oracle = (make(f) for make in CALLS[call])
    x = _points()
    out, vjp_fn = torch.func.vjp(ours, x)
    out_ref, vjp_ref = torch.func.vjp(oracle, x)
    cotangent = torch.randn_like(out_ref)
    assert_close64(vjp_fn(cotangent)[0], vjp_ref(cotangent)[0])
    assert_close64(torch.func.grad(lambda x: ours(x).pow(2).sum())(x),
                   torch.func.grad(lambda x: oracle(x).pow(2).sum())(x))
    batch = torch.randn(2, 7, 3, dtype=F64)
    assert_close64(vmap(ours)(batch), vmap(oracle)(batch))


def test_func_grad_over_parameters_with_functional_call():
    f = _square_model()
    params = dict(f.named_parameters())
    x = _points()

    def loss(p, jac_fn):
        return (jac_fn(lambda x: torch.func.functional_call(f, p, (x,)), x) ** 2).sum()

    got = torch.func.grad(loss)(params, lambda g, x: torchjac.jacobian(g, x))
    want = torch.func.grad(loss)(params, lambda g, x: vmap(jacrev(g))(x))
    for name in params:
        assert_close64(got[name], want[name])


def test_forward_mode_ad_over_torchjac():
    f = _square_model()
    x, v = _points(), _points()
    with forward_ad.dual_level():
        out = torchjac.divergence(f, forward_ad.make_dual(x, v))
        tangent = forward_ad.unpack_dual(out).tangent
    assert_close64(tangent, torch.func.jvp(_oracle_div(f), (x,), (v,))[1])


def test_laplacian_as_nested_torchjac_calls():
    """SIREN's laplace(): the divergence of the gradient of a scalar field, each a torchjac call (the inner
    one sees the outer one's transform and runs on the generic path)."""
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 16), torchjac.Sine(3.0), nn.Linear(16, 16), torchjac.Sine(1.0),
                      nn.Linear(16, 1)).double()
    x = _points(requires_grad=True)

    def gradient(p):
        return torchjac.jacobian(f, p)[..., 0, :]

    laplacian = torchjac.divergence(gradient, x)
    expected = vmap(hessian(lambda p: f(p)[0]))(x.detach()).diagonal(0, -2, -1).sum(-1)
    assert_close64(laplacian, expected)
    # And it trains: the gradient of a Laplacian loss reaches the parameters.
    params = list(f.parameters())
    got = _grads(laplacian.pow(2).sum(), params)
    y = f(x)
    g = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
    lap_ref = sum(torch.autograd.grad(g[:, i].sum(), x, create_graph=True)[0][:, i] for i in range(3))
    for a, e in zip(got, _grads(lap_ref.pow(2).sum(), params)):
        assert_close64(a, e)


# ---- 5. torch.compile

def _compiled_step_matches_eager(f, x, fullgraph):
    def step(x):
        jac = torchjac.jacobian(f, x)
        return (jac ** 2).sum() + jac.sum(-1).pow(3).sum()

    params = list(f.parameters())
    expected = _grads(step(x), params)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=fullgraph)
    for a, e in zip(_grads(compiled(x), params), expected):
        assert_close64(a, e)


def test_compiled_step_with_a_transposed_weight():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    f[2].weight = nn.Parameter(torch.randn(8, 3, dtype=F64).t())  # non-contiguous, like a tied transpose
    assert not f[2].weight.is_contiguous()
    _compiled_step_matches_eager(f, _points(), fullgraph=True)


def test_compiled_step_of_a_generic_path_module():
    class WithNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.norm, self.b = nn.Linear(3, 8), nn.LayerNorm(8), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(torch.tanh(self.norm(self.a(x))))

    torch.manual_seed(0)
    f = WithNorm().double()
    assert torchjac.explain(f).path == "generic"
    _compiled_step_matches_eager(f, _points(), fullgraph=True)


def test_compiled_step_of_a_generic_path_module_with_old_weight_norm():
    torch.manual_seed(0)
    f = nn.Sequential(old_weight_norm(nn.Linear(3, 8)), nn.LayerNorm(8), nn.Tanh(),
                      old_weight_norm(nn.Linear(8, 3))).double()
    assert torchjac.explain(f).path == "generic"
    _compiled_step_matches_eager(f, _points(), fullgraph=True)


# ---- 6. errors that say what to write instead

class OneInput(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(x)


class TimeFirst(nn.Module):
    """torchdiffeq/FFJORD dynamics: forward(t, y), the time first."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, t, y):
        return self.lin(torch.cat([y, t.expand_as(y[..., :1])], -1))


def test_cond_with_a_one_input_forward():
    with pytest.raises(ValueError, match=r"OneInput.forward\(x\).*pass a model whose forward takes \(x, cond\)"):
        torchjac.jacobian(OneInput().double(), _points(), cond=torch.randn(7, 2, dtype=F64))


@pytest.mark.parametrize("t_width", [1, 3])
def test_time_first_dynamics_passed_directly(t_width):
    f = TimeFirst().double()
    t = torch.full((7, t_width), 0.5, dtype=F64)
    with pytest.raises(ValueError, match=r"takes the time first.*x_arg='y' \(the parameter that receives x\)"):
        torchjac.divergence(f, _points(), cond=t)
    with pytest.raises(ValueError, match=r"takes the time first"):
        torchjac.divergence(f, _points())


@pytest.mark.parametrize("x_arg", ["y", 1])
def test_time_first_dynamics_with_x_arg_run_fused(x_arg):
    """x_arg names the parameter that receives x: the model itself is recognized, in every function."""
    f = TimeFirst().double()
    t = torch.full((7, 1), 0.5, dtype=F64)
    x = _points(requires_grad=True)
    y_ref, jac = oracle_jacobian(lambda y, t: f(t, y), x, t)
    assert torchjac.explain(f, cond=True, x_arg=x_arg).path == "fused"
    with ops_seen() as seen:
        y, div = torchjac.divergence(f, x, cond=t, x_arg=x_arg, return_output=True)
    assert "torchjac.mlp_divergence" in seen
    assert_close64(y, y_ref)
    assert_close64(div, jac.diagonal(0, -2, -1).sum(-1))
    assert_close64(torchjac.jacobian(f, x, cond=t, x_arg=x_arg), jac)
    v = torch.randn(7, 3, dtype=F64)
    assert_close64(torchjac.jvp(f, x, v, cond=t, x_arg=x_arg), (jac @ v[..., None])[..., 0])
    assert torchjac.laplacian(f, x, cond=t, x_arg=x_arg).shape == (7, 3)  # a linear map: 0
    assert torchjac.hessian(f, x, cond=t, x_arg=x_arg).abs().max() == 0
    expected = torch.autograd.grad(autograd_jacobian(lambda y, t: f(t, y), x, t)[1].sum(), [x, *f.parameters()],
                                   allow_unused=True, materialize_grads=True)
    got = torch.autograd.grad(torchjac.jacobian(f, x, cond=t, x_arg=x_arg).sum(), [x, *f.parameters()],
                              allow_unused=True, materialize_grads=True)
    for g, e in zip(got, expected):
        assert_close64(g, e)


@pytest.mark.parametrize("kwargs, match", [
    (dict(x_arg="z"), r"x_arg expected the position or the name of f's parameter that receives x \(0, 1 or one of "
                      r"the names \['t', 'y'\]\), got 'z'"),
    (dict(x_arg=2), r"x_arg expected the position or the name"),
    (dict(x_arg="y", cond=None), r"x_arg says which of f's two inputs is x; pass the other one as cond"),
])
def test_x_arg_errors(kwargs, match):
    kwargs = {"cond": torch.full((7, 1), 0.5, dtype=F64), **kwargs}
    with pytest.raises(ValueError, match=match):
        torchjac.divergence(TimeFirst().double(), _points(), **kwargs)


def test_x_arg_with_a_sequential_is_refused():
    with pytest.raises(ValueError, match=r"x_arg given, but torchjac calls an nn.Sequential on cat\(\[x, cond\]"):
        torchjac.jacobian(nn.Sequential(nn.Linear(4, 3)).double(), _points(), cond=torch.ones(7, 1, dtype=F64),
                          x_arg=1)


def test_time_first_dynamics_wrapped():
    f = TimeFirst().double()
    t = torch.full((7, 1), 0.5, dtype=F64)
    x = _points()
    expected = oracle_jacobian(lambda y, t: f(t, y), x, t)[1].diagonal(0, -2, -1).sum(-1)
    assert_close64(torchjac.divergence(lambda y, t: f(t, y), x, cond=t), expected)


def test_positional_encoding_reason_says_what_happens():
    class Encoded(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("bands", 2.0 ** torch.arange(3.0))
            self.lin = nn.Linear(9, 1)

        def forward(self, x):
            return self.lin(torch.sin(x[..., None] * self.bands).flatten(-2))

    f = Encoded().double()
    explanation = torchjac.explain(f)
    assert explanation.path == "generic"
    assert "'bands' (a parameter or buffer) outside any Linear layer" in explanation.detail
    _check_values(f, _points())


def test_kwargs_in_forward_is_recognized():
    class WithKwargs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 3)

        def forward(self, x, **kwargs):
            return self.b(torch.tanh(self.a(x)))

    f = WithKwargs().double()
    assert torchjac.explain(f).path == "fused"
    _check_values(f, _points())


def test_required_extra_argument_reason_says_what_to_write():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(3, 3)

        def forward(self, x, scale):
            return self.a(x) * scale

    assert "lambda x: model(...)" in torchjac.explain(Extra()).detail


def test_conv2d_inside_the_event():
    torch.manual_seed(0)
    f = nn.Sequential(nn.Conv2d(2, 3, kernel_size=3, padding=1), nn.Tanh(), nn.Conv2d(3, 1, 1)).double()
    x = torch.randn(2, 2, 4, 4, dtype=F64)
    jac = torchjac.jacobian(f, x, event_dims=3)
    expected = vmap(jacrev(lambda p: f(p[None])[0]))(x)
    assert_close64(jac, expected)
    with pytest.raises(ValueError, match="event_dims=3"):
        torchjac.jacobian(f, x.movedim(1, -1), event_dims=1)


# ---- the fused y is f(x), on every lowering

def _lowerings():
    torch.manual_seed(0)
    a = nn.GELU()
    return {
        "point_mlp": (torchjac.PointMLP(3, [8, 8], 2, activation="tanh", skip_layers=(1,)), None),
        "sequential_reused": (nn.Sequential(nn.Linear(3, 8), a, nn.Linear(8, 8), a, nn.Linear(8, 2)), None),
        "sequential_cond": (nn.Sequential(nn.Linear(5, 8), nn.Softplus(), nn.Linear(8, 2)), 2),
        "conv1d": (nn.Sequential(nn.Conv1d(3, 8, 1), nn.BatchNorm1d(8).eval(), nn.ReLU(), nn.Conv1d(8, 2, 1)), None),
        "recognized": (NeuSLike(), None),
    }


class NeuSLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(3, 8), nn.Linear(11, 1)
        self.act = nn.Softplus(beta=100)

    def forward(self, x):
        h = self.act(self.l0(x))
        return self.l1(torch.cat([h, x], -1) / math.sqrt(2))


@pytest.mark.parametrize("name", sorted(_lowerings()))
def test_fused_output_is_the_model_output(name):
    f, c = _lowerings()[name]
    f = f.double()
    x = torch.randn(2, 3, 5, dtype=F64) if name == "conv1d" else _points()
    cond = None if c is None else torch.randn(7, c, dtype=F64)
    assert torchjac.explain(f).path == "fused"
    with ops_seen() as seen:
        y, _ = torchjac.jacobian(f, x, cond=cond, return_output=True)
    assert seen & {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}
    expected = f(x) if cond is None else f(torch.cat([x, cond], -1))
    torch.testing.assert_close(y, expected, rtol=1e-13, atol=1e-13)


class FunctionalLinear(nn.Module):
    """Layers written with F.linear and the module's own parameters, and h @ W.t() + b."""

    def __init__(self):
        super().__init__()
        self.w0, self.b0 = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8))
        self.w1 = nn.Parameter(torch.randn(2, 8))

    def forward(self, x):
        return torch.tanh(nn.functional.linear(x, self.w0, self.b0)) @ self.w1.t()


def test_functional_linear_with_own_parameters():
    torch.manual_seed(3)
    f = FunctionalLinear().double()
    assert torchjac.explain(f).path == "fused"
    x = _points(requires_grad=True)
    _check_values(f, x.detach())
    _check_training_grads(f, x)


class FloorDivided(nn.Module):
    def __init__(self):
        super().__init__()
        self.l0 = nn.Linear(3, 2)

    def forward(self, x):
        return self.l0(torch.div(x, 0.3, rounding_mode="floor"))


class SharedBiasEntry(nn.Module):
    """A (1, n) view of one bias entry, expanded: not the bias itself."""

    def __init__(self):
        super().__init__()
        self.W, self.b = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(8))
        self.l1 = nn.Linear(8, 2)

    def forward(self, x, params=None):
        from collections import OrderedDict
        params = OrderedDict(self.named_parameters()) if params is None else params
        return self.l1(torch.tanh(x.matmul(params["W"].t()) + params["b"][:1].expand(1, 8)))


class OddShapes(nn.Module):
    """A bias of shape (1,) and a 1-dim weight: not nn.Linear's shapes."""

    def __init__(self, one_dim_weight):
        super().__init__()
        self.one_dim_weight = one_dim_weight
        self.W, self.b1 = nn.Parameter(torch.randn(8, 3)), nn.Parameter(torch.randn(1))
        self.w = nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = torch.tanh(x @ self.W.t() + (0.0 if self.one_dim_weight else self.b1))
        return nn.functional.linear(h, self.w)[..., None] if self.one_dim_weight else h


@pytest.mark.parametrize("make", [FloorDivided, SharedBiasEntry, lambda: OddShapes(False), lambda: OddShapes(True)],
                         ids=["floor_div", "shared_bias_entry", "bias_of_one", "one_dim_weight"])
def test_forms_that_are_not_linear_layers_take_the_generic_path(make):
    """Found in review: the first two folded silently wrong, the others raised."""
    torch.manual_seed(7)
    f = make().double()
    assert torchjac.explain(f).path == "generic"
    x = _points()
    _check_values(f, x)


class _InstanceForwardField(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last, self.act = nn.Linear(3, 8), nn.Linear(8, 3), nn.Softplus(beta=10.0)

    def forward(self, x):
        return self.last(self.act(self.first(x)))


def _half_forward(self, x):
    return self.last(self.act(self.first(x))) * 0.5


def test_a_forward_set_on_the_instance_is_called_by_the_generic_path():
    """torch.fx traces the class's forward, and the fused path reads layers by type; the instance's forward is
    the one the model runs (it was silently ignored)."""
    torch.manual_seed(0)
    f, x = _InstanceForwardField().double(), _points(40)
    f.forward = types.MethodType(_half_forward, f)
    assert torchjac.explain(f, x).path == "generic"
    _check_values(f, x)
    del f.forward
    f.act.forward = torch.tanh  # on a layer the fused path reads by its type
    assert torchjac.explain(f, x).path == "generic"
    _check_values(f, x)


class _DtypeBranch(_InstanceForwardField):
    def forward(self, x):
        scale = 2.0 if x.dtype == torch.float64 else 0.5
        return self.last(self.act(self.first(x * scale)))


class _DeviceBranch(_InstanceForwardField):
    def forward(self, x):
        scale = 2.0 if x.device.type == "cpu" else 0.5
        return self.last(self.act(self.first(x * scale)))


class _OwnCall(_InstanceForwardField):
    def __call__(self, x):
        return super().__call__(x) * 2.0


@pytest.mark.parametrize("model", [_DtypeBranch, _DeviceBranch, _OwnCall], ids=lambda m: m.__name__)
def test_what_recognition_cannot_see_is_called_by_the_generic_path(model):
    """Found in review, each a wrong Jacobian before: a branch on x.dtype or x.device, which recognition
    evaluated on meta tensors of the default dtype; a __call__ of the model's own, which torch.fx skips."""
    torch.manual_seed(0)
    f, x = model().double(), _points(40)
    assert torchjac.explain(f, x).path == "generic"
    _check_values(f, x)


def test_a_replaced_library_forward_is_called_by_the_generic_path(monkeypatch):
    """nn.Linear.forward (or nn.Module.__call__) replaced by the user: the fused path reads Linear layers by
    their type, so it gave the unpatched model's Jacobian."""
    torch.manual_seed(0)
    f, x = _InstanceForwardField().double(), _points(40)
    linear = nn.Linear.forward
    monkeypatch.setattr(nn.Linear, "forward", lambda self, h: linear(self, h) * 2.0)
    assert torchjac.explain(f, x).path == "generic"
    _check_values(f, x)
    monkeypatch.undo()
    call = nn.Module.__call__
    monkeypatch.setattr(nn.Module, "__call__", lambda self, *a: call(self, *a) * 2.0)
    assert torchjac.explain(f, x).path == "generic"
    _check_values(f, x)
    monkeypatch.undo()
    assert torchjac.explain(f, x).path == "fused"
