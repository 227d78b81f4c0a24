"""The model zoo (tests/zoo.py) against autograd oracles: values, training gradients, explain(), compile.

Every model runs in float64 and is compared to 1e-10 with torch.func's vmap(jacrev) (values) and the
create_graph autograd loop (training gradients), never with torchjac's own math.
"""
import dataclasses
import math
from typing import Callable, Optional

import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import torchjac
import zoo
from conftest import assert_close64, autograd_jacobian, oracle_jacobian
from ops_seen import ops_seen

FUSED_OPS = {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse", "torchjac.mlp_divergence", "torchjac.mlp_jvp",
             "torchjac.mlp_hutchinson"}


@dataclasses.dataclass
class Case:
    model: nn.Module                     # owns the parameters
    f: Callable                          # what is passed to torchjac
    x: torch.Tensor
    cond: Optional[torch.Tensor]
    loss: Callable                       # loss(y, J) or, with square=True, loss(y, div)
    explain: tuple                       # (path, a substring of the detail), as explain() says today
    explain_of: object = None            # what explain() is asked about, when not f
    square: bool = False                 # d_out == d_in: also the divergence, and the loss is built on it
    channels_first: bool = False         # PointNet: x is (B, C, N)
    run: Optional[Callable] = None       # run(api, x, cond) -> (y, result), when not api(f, x, cond=cond)
    x_arg: Optional[str] = None          # torchjac is given the model itself, called model(cond, x)
    branches_on_shape: bool = False      # explain() needs an example input to tell the path

    def call(self, api, x, cond):
        if self.run is not None:
            return self.run(api, x, cond)
        if self.x_arg is not None:
            return api(self.model, x, cond=cond, x_arg=self.x_arg, return_output=True)
        return api(self.f, x, cond=cond, return_output=True)


def _perturb(model, scale=0.05):
    """Move every parameter off its init (zeroed encoding columns, constant hypernetwork weights) so that
    every derivative path carries a nonzero value."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn_like(p))
    return model


def _points(*shape, scale=1.0):
    return (scale * torch.randn(*shape, dtype=torch.float64)).requires_grad_(True)


def eikonal(y, jac):
    """SDF training: eikonal term on the sdf's gradient plus a surface term."""
    grad = jac[..., 0, :]
    return ((grad.norm(dim=-1) - 1) ** 2).mean() + (y[..., 0] ** 2).mean()


def cnf_nll(y, div, dt=0.1):
    """One Euler step of a CNF's negative log-likelihood: z1 = z + dt f, log p += dt div f."""
    z1 = CURRENT_X[0] + dt * y
    return (0.5 * (z1 ** 2).sum(-1) - dt * div).mean()


CURRENT_X = [None]  # the x of the running case, for cnf_nll (the loss needs z itself)


def elastic(y, jac):
    """Nerfies' elastic regularizer: robust loss of sum(log(singular values of J)^2), plus the offset."""
    log_s = torch.log(torch.linalg.svdvals(jac))
    return zoo.geman_mcclure((log_s ** 2).sum(-1), 0.03).mean() + (y ** 2).mean()


def frobenius(y, jac):
    return (jac ** 2).mean() + (y ** 2).mean()


def nerf_loss(y, jac):
    """Density-gradient normals (Ref-NeRF style) and a smoothness term on the colour's gradient."""
    normals = -jac[..., 3, :]
    return (normals ** 2).sum(-1).mean() + (jac[..., :3, :] ** 2).mean() + (y ** 2).mean()


def siren_loss(y, jac):
    """SIREN's Poisson fit: the gradient of the image against a target gradient field."""
    target = torch.ones_like(jac[..., 0, :])
    return ((jac[..., 0, :] - target) ** 2).mean() + (y ** 2).mean()


# ---- the zoo

def neus():
    m = _perturb(zoo.NeuSSDFNetwork(scale=1.5).double())
    return Case(m, m, _points(24, 3, scale=0.5), None, eikonal,
                ("fused", "a frequency encoding of x (8 sin/cos blocks), 5 Linear layers, skips into layers [2], "
                          "output features [0, 1, 2, 3, 4]"))


def idr():
    m = _perturb(zoo.IDRImplicitNetwork().double())
    return Case(m, m, _points(24, 3, scale=0.5), None, eikonal,
                ("fused", "a frequency encoding of x (8 sin/cos blocks), 5 Linear layers, skips into layers [2]"))


def igr():
    m = _perturb(zoo.IGRImplicitNet().double())
    return Case(m, m, _points(24, 3), None, eikonal, ("fused", "traced by torch.fx: 5 Linear layers, skips into"))


def deepsdf():
    decoder = _perturb(zoo.DeepSDFDecoder().double()).eval()  # eval: its dropout is the identity
    m = zoo.LatentSDF(decoder)
    latent = (0.5 * torch.randn(1, 8, dtype=torch.float64)).requires_grad_(True)
    return Case(m, m, _points(24, 3, scale=0.5), latent, eikonal,
                ("fused", "LatentSDF traced by torch.fx: 5 Linear layers, skips into layers [2]; jacobian in reverse "
                          "mode (d_in=3, d_out=1)"), branches_on_shape=True)


# FFJORD's layers: t concatenated, t's gate and shift folded into the layer, weights computed from t, two
# Linear layers of one input mixed by t (blend).
FFJORD_EXPLAIN = {"concat": ("fused", "ODEnet, called as f(cond, x), traced by torch.fx: 3 Linear layers, skips"),
                  "ignore": ("fused", "ODEnet, called as f(cond, x), traced by torch.fx: 3 Linear layers"),
                  "squash": ("fused", "3 Linear layers, layers [0, 1, 2] modulated by cond"),
                  "concatsquash": ("fused", "3 Linear layers, layers [0, 1, 2] modulated by cond"),
                  "hyper": ("fused", "3 Linear layers, the weights of layers [0, 1, 2] computed from cond"),
                  "blend": ("fused", "3 Linear layers, layers [0, 1, 2] mixing Linear layers of one input")}


def ffjord(layer_type, nonlinearity):
    def make():
        net = _perturb(zoo.ODEnet((16, 16), 3, layer_type, nonlinearity).double(), 0.2)
        t = torch.tensor([0.3], dtype=torch.float64)
        return Case(net, lambda y, t: net(t, y), _points(16, 3), t, cnf_nll, FFJORD_EXPLAIN[layer_type],
                    square=True, x_arg="y")
    return make


def hyper_cnf():
    m = _perturb(zoo.HyperCNF(2, 16, 16).double(), 0.2)
    t = torch.tensor([0.4], dtype=torch.float64)
    return Case(m, lambda z, t: m(t, z), _points(16, 2), t, cnf_nll,
                ("fused", "2 Linear layers, layers [0] modulated by cond, the weights of layers [0, 1] computed from "
                          "cond"), square=True, x_arg="z")


class _Apply(nn.Module):
    """torchjac's call as a module, so torch.func.functional_call can put a hypernetwork's weights into f."""

    def __init__(self, f, api):
        super().__init__()
        self.f, self.api = f, api

    def forward(self, x):
        return self.api(self.f, x, return_output=True)


def hyper_cnf_functional_call():
    """The same CNF with the hypernetwork's W, B, U put into Linear -> Tanh -> Linear (fused)."""
    m = _perturb(zoo.HyperCNF(2, 16, 16).double(), 0.2)
    template = m.template().double()
    t = torch.tensor([0.4], dtype=torch.float64)

    appliers = {api: _Apply(template, api) for api in (torchjac.jacobian, torchjac.divergence)}

    def run(api, z, t):
        return torch.func.functional_call(appliers[api], m.as_sequential_params(t, "f."), (z,))

    return Case(m, lambda z, t: m(t, z), _points(16, 2), t, cnf_nll, ("fused", "nn.Sequential"),
                explain_of=template, square=True, run=run)


def siren_fcblock():
    m = _perturb(zoo.FCBlock(2, 1, 2, 32).double(), 0.01)
    # BatchLinear reads its parameters through a dict: torch.fx bakes the views it takes of them
    return Case(m, m, _points(20, 2), None, siren_loss, ("fused", "FCBlock traced by torch.fx: 4 Linear layers"))


def siren_metasequential():
    m = _perturb(zoo.FCBlock(2, 1, 2, 32).double(), 0.01)
    return Case(m, m.net, _points(20, 2), None, siren_loss,
                ("fused", "MetaSequential traced by torch.fx: 4 Linear layers"))  # its own forward, traced


def siren_sequential():
    m = _perturb(zoo.Siren(2, 32, 2, 1).double(), 0.01)
    return Case(m, m.net, _points(20, 2), None, siren_loss,
                # a Sequential of custom SineLayer blocks: torch.fx traces through them
                ("fused", "traced by torch.fx: 4 Linear layers"))


def pointnet():
    m = zoo.pointnet_shared_mlp().double()
    with torch.no_grad():
        for bn in m:
            if isinstance(bn, nn.BatchNorm1d):
                bn.running_mean.normal_()
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1.0, 0.2)
                bn.bias.normal_()
    m.eval()
    return Case(m, m, _points(2, 3, 10), None, frobenius, ("fused", "Conv1d(kernel_size=1)"), channels_first=True)


def nerf():
    m = _perturb(zoo.NeRF().double())
    viewdirs = torch.nn.functional.normalize(torch.randn(24, 3, dtype=torch.float64), dim=-1)
    return Case(m, m, _points(24, 3), viewdirs, nerf_loss, ("generic", "a tensor computed from cond (an encoding of cond, say)"))


def nerfies_se3():
    m = _perturb(zoo.SE3Field().double())
    latent = torch.nn.Embedding(4, 8).double()
    m.add_module("warp_embed", latent)  # the per-image codes train with the field
    codes = latent(torch.tensor([1, 3]))[:, None, :]
    return Case(m, m, _points(2, 10, 3), codes, elastic, ("generic", "outside any nn.Linear layer"), square=True)


def nerfies_translation():
    m = _perturb(zoo.TranslationField().double())
    latent = torch.nn.Embedding(4, 8).double()
    m.add_module("warp_embed", latent)
    codes = latent(torch.tensor([0, 2]))[:, None, :]
    return Case(m, m, _points(2, 10, 3), codes, elastic, ("generic", "outside any nn.Linear layer"), square=True)


CASES = {
    "neus": neus, "idr": idr, "igr": igr, "deepsdf": deepsdf,
    **{f"ffjord_{k}": ffjord(k, a) for k, a in (("concatsquash", "softplus"), ("squash", "tanh"),
                                                 ("concat", "tanh"), ("blend", "elu"), ("hyper", "tanh"),
                                                 ("ignore", "softplus"))},
    "hyper_cnf": hyper_cnf, "hyper_cnf_functional_call": hyper_cnf_functional_call,
    "siren_fcblock": siren_fcblock, "siren_metasequential": siren_metasequential, "siren_sequential": siren_sequential,
    "pointnet": pointnet, "nerf": nerf, "nerfies_se3": nerfies_se3, "nerfies_translation": nerfies_translation,
}


def _case(name) -> Case:
    torch.manual_seed(0)
    case = CASES[name]()
    CURRENT_X[0] = case.x
    return case


# ---- oracles

def _oracle_jacobian(case, x, cond):
    """(y, J) from vmap(jacrev) of the model as the paper calls it."""
    if case.channels_first:
        lead = (x.shape[0], x.shape[2])
        xf = x.movedim(1, -1).reshape(-1, x.shape[1])
        jac = vmap(jacrev(lambda p: case.f(p[None, :, None])[0, :, 0]))(xf)
        return case.f(x), jac.reshape(*lead, *jac.shape[-2:])
    if cond is not None and cond.dim() == 1:  # one time t for every point (FFJORD's t.view(1, 1))
        jac = vmap(jacrev(lambda p: case.f(p[None], cond)[0]))(x.reshape(-1, x.shape[-1]))
        return case.f(x, cond), jac.reshape(*x.shape[:-1], *jac.shape[-2:])
    return oracle_jacobian(case.f, x, cond)


def _autograd_jacobian(case, x, cond):
    """(y, J) from the create_graph autograd loop, differentiable w.r.t. everything."""
    if case.channels_first:
        y = case.f(x)
        rows = [torch.autograd.grad(y[:, i].sum(), x, create_graph=True)[0] for i in range(y.shape[1])]
        return y, torch.stack(rows, 1).permute(0, 3, 1, 2)   # (B, N, d_out, d_in)
    return autograd_jacobian(case.f, x, cond)


def _loss_inputs(case, y, jac):
    return (y, jac.diagonal(0, -2, -1).sum(-1)) if case.square else (y, jac)


def _torchjac_loss(case, x, cond):
    api = torchjac.divergence if case.square else torchjac.jacobian
    return case.loss(*case.call(api, x, cond))


def _leaves(case):
    leaves = [case.x] + list(case.model.parameters())
    if case.cond is not None and case.cond.requires_grad and case.cond.is_leaf:
        leaves.append(case.cond)
    return leaves


def _grads(loss, leaves):
    return [torch.zeros_like(leaf) if g is None else g
            for g, leaf in zip(torch.autograd.grad(loss, leaves, allow_unused=True, retain_graph=True), leaves)]


NAMES = sorted(CASES)


@pytest.mark.parametrize("name", NAMES)
def test_values_match_the_oracle(name):
    case = _case(name)
    x = case.x.detach()
    cond = None if case.cond is None else case.cond.detach()
    y_ref, jac_ref = _oracle_jacobian(case, x, cond)
    if case.run is None:  # jacobian needs f itself
        y, jac = case.call(torchjac.jacobian, x, cond)
        assert_close64(jac, jac_ref)
        assert_close64(y, y_ref)
    if case.square:
        y, div = case.call(torchjac.divergence, x, cond)
        assert_close64(div, jac_ref.diagonal(0, -2, -1).sum(-1))
        assert_close64(y, y_ref)


@pytest.mark.parametrize("name", NAMES)
def test_training_gradients_match_create_graph(name):
    case = _case(name)
    leaves = _leaves(case)
    y_ref, jac_ref = _autograd_jacobian(case, case.x, case.cond)
    expected = _grads(case.loss(*_loss_inputs(case, y_ref, jac_ref)), leaves)
    # The loss reaches every parameter (weight_g and weight_v of old weight_norm included), so a torchjac
    # gradient that misses one cannot pass.
    for e, leaf in zip(expected, leaves):
        assert e.abs().max() > 0, f"the loss does not reach a leaf of shape {tuple(leaf.shape)}"
    actual = _grads(_torchjac_loss(case, case.x, case.cond), leaves)
    for a, e in zip(actual, expected):
        assert_close64(a, e)


@pytest.mark.parametrize("name", NAMES)
def test_explain_says_which_path_runs(name):
    case = _case(name)
    target = case.model if case.x_arg else case.f if case.explain_of is None else case.explain_of
    has_cond = case.cond is not None and case.explain_of is None
    why = torchjac.explain(target, cond=has_cond, x_arg=case.x_arg)
    if case.branches_on_shape:  # without an example input the shapes are not known
        assert why.path == "generic" and "explain(f, x) with an example input" in why.detail, why
    if case.explain_of is None:  # as the call: x and cond given, as to the other functions
        with_example = torchjac.explain(target, case.x, cond=case.cond, x_arg=case.x_arg)
        if not case.branches_on_shape:
            assert with_example.path == why.path, (why, with_example)
        why = with_example
    path, detail = case.explain
    assert why.path == path, why
    assert detail in why.detail, why
    # explain() must describe what actually runs: a torchjac op on the fused path, none on the generic one.
    with ops_seen() as seen, torch.no_grad():
        case.call(torchjac.divergence if case.square else torchjac.jacobian, case.x, case.cond)
    if case.explain_of is None:
        assert bool(seen & FUSED_OPS) == (why.path == "fused"), (why, sorted(seen & FUSED_OPS))


# Generic today: nerf (two heads, the view directions' encoding), nerfies_* (their annealed encoding, SE(3)
# math). Fused: neus and idr (frequency encoding, output slices), igr, deepsdf, every ffjord_* (x_arg="y"; t
# concatenated, gates, hyper weights and blends folded), hyper_cnf (x_arg="z"; per-unit batched matmuls with
# weights from t), siren_* (BatchLinear's parameter views, SineLayer blocks), pointnet (Conv1d stack),
# hyper_cnf_functional_call (nn.Sequential).


# ---- compiled training steps: one per model, small, aot_eager (inductor's C++ build is too slow here)

COMPILED = ["neus", "idr", "igr", "deepsdf", "ffjord_concat", "ffjord_concatsquash", "ffjord_hyper", "ffjord_blend",
            "ffjord_squash", "ffjord_ignore",
            "siren_fcblock", "hyper_cnf", "hyper_cnf_functional_call", "siren_metasequential", "pointnet", "nerfies_se3"]


@pytest.mark.parametrize("name", COMPILED)
def test_compiled_training_step_equals_eager(name):  # compile test
    case = _case(name)
    leaves = _leaves(case)

    def step(x, cond):
        return _torchjac_loss(case, x, cond)

    expected_loss = step(case.x, case.cond)
    expected = _grads(expected_loss, leaves)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(case.x, case.cond)
    assert_close64(loss, expected_loss)
    for a, e in zip(_grads(loss, leaves), expected):
        assert_close64(a, e)


# ---- what the papers do with the derivatives beyond J

@pytest.mark.parametrize("name", ["ffjord_concatsquash", "hyper_cnf"])
def test_hutchinson_with_one_noise_per_solve(name):
    """FFJORD draws e once per ODE solve and reuses it: the estimate is e^T J e with that e."""
    case = _case(name)
    e = torch.randint(0, 2, case.x.shape, dtype=torch.float64) * 2 - 1
    _, jac_ref = _autograd_jacobian(case, case.x, case.cond)
    expected = torch.einsum("pi,pij,pj->p", e, jac_ref, e)
    got = torchjac.divergence(case.f, case.x, cond=case.cond, estimator="hutchinson", noise=e)
    assert_close64(got, expected)
    leaves = list(case.model.parameters())
    for a, b in zip(_grads((got ** 2).sum(), leaves), _grads((expected ** 2).sum(), leaves)):
        assert_close64(a, b)


def test_siren_laplacian_nests_divergence_over_jacobian():
    """SIREN's Poisson and Helmholtz losses: the Laplacian, the divergence of the gradient."""
    case = _case("siren_sequential")
    x = case.x

    def grad_field(p):
        return torchjac.jacobian(case.f, p)[..., 0, :]

    lap = torchjac.divergence(grad_field, x)
    _, jac = autograd_jacobian(case.f, x)
    g = jac[..., 0, :]
    expected = sum(torch.autograd.grad(g[..., i].sum(), x, create_graph=True)[0][..., i] for i in range(2))
    assert_close64(lap, expected)


# ---- float32: the dtype these models train in

def _rel_err(actual, expected):
    scale = expected.abs().max().clamp_min(1e-30)
    return ((actual.double() - expected).abs().max() / scale).item()


@pytest.mark.parametrize("name", NAMES)
def test_float32_values_and_gradients_match_the_float64_oracle(name):
    """In float32, torchjac's values, J (or divergence) and training gradients are within 1e-5 of the float64
    oracle's largest entry, or within 8x PyTorch's own float32 autograd error where that is larger."""
    case = _case(name)
    leaves64 = [case.x] + list(case.model.parameters())
    y64, jac64 = _autograd_jacobian(case, case.x, case.cond)
    out64 = _loss_inputs(case, y64, jac64)
    grads64 = _grads(case.loss(*out64), leaves64)
    cond64 = None if case.cond is None else case.cond.detach()

    case.model.float()
    x32 = case.x.detach().float().requires_grad_(True)
    cond32 = None if cond64 is None else cond64.float()
    CURRENT_X[0] = x32
    leaves32 = [x32] + list(case.model.parameters())
    api = torchjac.divergence if case.square else torchjac.jacobian
    y, out = case.call(api, x32, cond32)
    grads = _grads(case.loss(y, out), leaves32)
    y_t, jac_t = _autograd_jacobian(case, x32, cond32)  # PyTorch's own float32 error, the floor
    out_t = _loss_inputs(case, y_t, jac_t)
    grads_t = _grads(case.loss(*out_t), leaves32)

    checks = [("y", y, y_t, out64[0]), ("J" if not case.square else "divergence", out, out_t[1], out64[1])]
    checks += [(f"gradient {i}", g, g_t, g64) for i, (g, g_t, g64) in enumerate(zip(grads, grads_t, grads64))]
    for what, got, torch_got, want in checks:
        assert got.dtype == torch.float32, f"{what}: {got.dtype}"
        allowed = max(1e-5, 8 * _rel_err(torch_got, want))
        err = _rel_err(got, want)
        assert err <= allowed, f"{name} {what}: relative error {err:.2e} > {allowed:.2e} (float32)"
