"""Random point-wise MLPs and inputs, and the check of every torchjac function on them against autograd.

The strategy ``cases()`` draws the model (form, depth, widths, activations and
their parameters, cond, skips; for a user-written "encoded" module, a NeRF-style
frequency encoding of x that the skips read, and a scaled output slice), the idioms a Sequential is written with (one
activation instance reused, tied Linear layers, subclasses with and without a
forward of their own, nested Sequentials, old and new weight_norm, forward
hooks) and the input (leading shape, zero-size, non-contiguous, dtype). ``check(case)`` runs jacobian, divergence (exact and
Hutchinson with a fixed noise), jvp, their outputs and their gradients w.r.t.
x, cond, v and every parameter, and compares all of them with the autograd
``create_graph`` oracle evaluated in float64. Some cases also check
``torch.func.jvp`` over ``jacobian``, a ``torch.compile``d call, and (in float64)
laplacian (exact and Hutchinson) and hessian with their gradients against nested
``create_graph`` autograd.

float64 results must match the oracle to 1e-10 of the result's scale. A
float32 result must be within 1e-5 of its scale, or else no further from the
float64 oracle than 4x PyTorch's own float32 autograd: deep, wide or
high-frequency models lose digits in float32 whatever computes them. A float32
case whose float64 pre-activation lies within float32 rounding of a jump in an
activation's derivative (ReLU, LeakyReLU, ELU at 0, Softplus at its threshold)
is rejected: there either side is a right float32 answer, and the Jacobians of
two float32 codes may differ by the jump.
"""
import copy
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
from hypothesis import assume
from hypothesis import strategies as st
from torch import nn
from torch.nn.utils import parametrizations

import torchjac
from conftest import autograd_hessian, autograd_jacobian, call_model, oracle_jacobian

MAX_WIDTH = 300


def _activation_modules():
    """Every supported activation, with its parameters drawn."""
    pos = dict(allow_nan=False, allow_infinity=False)
    return st.one_of(
        st.just(nn.ReLU()),
        st.floats(0.0, 0.5, **pos).map(nn.LeakyReLU),
        st.builds(nn.Softplus, beta=st.floats(0.25, 50.0, **pos), threshold=st.floats(1.0, 30.0, **pos)),
        st.just(nn.SiLU()),
        st.just(nn.GELU()),
        st.just(nn.GELU(approximate="tanh")),
        st.just(nn.Tanh()),
        st.just(nn.Sigmoid()),
        st.floats(0.1, 2.0, **pos).map(nn.ELU),
        st.just(nn.Identity()),
        st.floats(0.5, 30.0, **pos).map(torchjac.Sine),
    )


class Case(NamedTuple):
    form: str                      # "point_mlp", "sequential", "encoded" or "function" (the generic path)
    d_in: int
    d_out: int
    widths: Tuple[int, ...]
    activations: Tuple[nn.Module, ...]  # one per hidden layer (PointMLP: the first is used for all)
    final_activation: Optional[nn.Module]
    cond_features: int
    skip_layers: Tuple[int, ...]
    lead: Tuple[int, ...]                 # x's leading dims
    cond_lead: Optional[Tuple[int, ...]]  # cond's; they broadcast against x's, either way; None: no cond
    non_contiguous: bool
    num_samples: int
    dtype: torch.dtype
    seed: int
    idioms: Tuple[str, ...] = ()   # how a "sequential" is written: see IDIOMS
    check_func: bool = False       # also torch.func.jvp over jacobian
    check_compiled: bool = False   # also a torch.compile'd jacobian and its gradients
    check_second_order: bool = False  # also laplacian and hessian (float64), for d_in <= 8
    bands: Tuple[float, ...] = ()  # "encoded": the frequencies c of sin(c x), cos(c x)
    include_input: bool = True     # "encoded": x itself is part of the encoding
    output_scale: Optional[float] = None  # "encoded": the first output feature is scaled by it
    modulated: Tuple[int, ...] = ()  # "encoded": layers FiLM-modulated by cond, shared by all points (not concatenated)


# Ways of writing the same Sequential; each keeps the function it computes, or (hook) changes it knowingly.
IDIOMS = ("shared_activation", "tied_linear", "subclass", "subclass_forward", "nested", "old_weight_norm",
          "weight_norm", "forward_hook", "layer_subclass")


@st.composite
def cases(draw):
    form = draw(st.sampled_from(["point_mlp", "sequential", "encoded", "function"]))
    depth = draw(st.sampled_from(range(1, 7)))  # Linear layers; sampled_from draws them evenly
    widths = tuple(draw(st.one_of(st.integers(1, 32), st.integers(1, MAX_WIDTH))) for _ in range(depth - 1))
    activations = tuple(draw(_activation_modules()) for _ in range(depth - 1))
    final_activation = draw(st.one_of(st.none(), _activation_modules())) if form != "point_mlp" else None
    points = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))  # the broadcast leading shape

    def broadcasting_part():
        """A suffix of the broadcast shape with some dims 1: x and cond each broadcast the other."""
        kept = draw(st.integers(0, len(points)))
        return tuple(n if draw(st.booleans()) else 1 for n in points[len(points) - kept:])

    with_cond = draw(st.booleans())
    cond_features = draw(st.integers(1, 4)) if with_cond else 0
    lead = broadcasting_part() if with_cond else points
    cond_lead = broadcasting_part() if with_cond else None
    modulated = ()
    if form == "encoded" and with_cond and draw(st.booleans()):  # FiLM: one cond for all points
        modulated = tuple(sorted(draw(st.sets(st.integers(0, depth - 1), min_size=1, max_size=depth))))
        lead, cond_lead = points, (1,) * len(points)
    elif form == "encoded" and with_cond:  # its forward concatenates cond as it comes: no broadcasting
        lead = cond_lead = points
    skips = ()
    if form in ("point_mlp", "encoded") and depth > 1:
        skips = tuple(sorted(draw(st.sets(st.integers(1, depth - 1), max_size=depth - 1))))
    d_in = draw(st.integers(1, 16))
    d_out = draw(st.one_of(st.just(d_in), st.integers(1, 16)))  # half square: divergence needs d_out == d_in
    idioms = ()
    if form == "sequential":
        idioms = tuple(i for i in IDIOMS if draw(st.integers(0, 3)) == 0)
    encoding = {}
    if form == "encoded":
        pos = dict(allow_nan=False, allow_infinity=False)
        encoding = dict(bands=tuple(draw(st.lists(st.floats(0.1, 8.0, **pos), min_size=1, max_size=3))),
                        include_input=draw(st.booleans()),
                        output_scale=draw(st.one_of(st.none(), st.floats(0.2, 5.0, **pos))), modulated=modulated)
    return Case(form, d_in, d_out, widths, activations, final_activation,
                cond_features, skips, lead, cond_lead, draw(st.booleans()), draw(st.integers(1, 3)),
                draw(st.sampled_from([torch.float32, torch.float64])), draw(st.integers(0, 2 ** 31 - 1)),
                idioms, draw(st.integers(0, 19)) == 0, draw(st.integers(0, 99)) == 0,
                d_in <= 8 and draw(st.integers(0, 9)) == 0, **encoding)


class _Subclass(nn.Sequential):
    """A Sequential subclass that keeps nn.Sequential's forward: it lowers as a chain."""


class _SubclassWithForward(nn.Sequential):
    """A Sequential subclass with a forward of its own, which halves the output: lowering it as a plain
    chain would be wrong. torch.fx recognizes it, or the generic path computes it."""

    def forward(self, inp):
        for module in self._modules.values():
            inp = module(inp)
        return inp * 0.5


class _DoubledLinear(nn.Linear):
    """A Linear subclass with a forward of its own: not a Linear layer to the lowering."""

    def forward(self, inp):
        return 2.0 * super().forward(inp)


def _halve_output(module, inputs, output):
    return 0.5 * output


def _sequential(case: Case, layers):
    """layers as a Sequential written with the case's idioms."""
    idioms = set(case.idioms)
    if "shared_activation" in idioms:  # one activation module, used after every layer
        shared = next((m for m in layers if not isinstance(m, nn.Linear)), None)
        layers = [m if isinstance(m, nn.Linear) else shared for m in layers]
    if "tied_linear" in idioms:  # a later Linear of the same shape is an earlier one, used again
        by_shape = {}
        layers = [by_shape.setdefault(tuple(m.weight.shape), m) if isinstance(m, nn.Linear) else m for m in layers]
    scaled = set()
    for previous, m in zip(layers, layers[1:]):  # after the sharing: every Linear that follows a Sine
        if isinstance(m, nn.Linear) and id(m) not in scaled:
            scaled.add(id(m))
            _siren_init(m, previous)
    if "layer_subclass" in idioms:  # the first Linear doubles its output
        first = layers[0]
        doubled = _DoubledLinear(first.in_features, first.out_features)
        doubled.load_state_dict(first.state_dict())
        layers = [doubled if m is first else m for m in layers]
    normed = set()
    for m in layers[::2]:  # every other module: some Linear layers, some not
        # With one input feature v/|v| is +-1 and the gradient w.r.t. v is identically zero: float32 would
        # report nothing but round-off of the terms that cancel.
        if isinstance(m, nn.Linear) and m.in_features > 1 and id(m) not in normed:
            normed.add(id(m))
            if "old_weight_norm" in idioms:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", FutureWarning)
                    nn.utils.weight_norm(m)
            elif "weight_norm" in idioms:
                parametrizations.weight_norm(m)
    if "nested" in idioms and len(layers) > 1:
        layers = [nn.Sequential(*layers[:len(layers) // 2]), nn.Sequential(*layers[len(layers) // 2:])]
    cls = (_SubclassWithForward if "subclass_forward" in idioms else
           _Subclass if "subclass" in idioms else nn.Sequential)
    model = cls(*layers)
    if "forward_hook" in idioms:
        model[-1].register_forward_hook(_halve_output)
    return model


def _siren_init(linear: nn.Linear, previous_activation):
    """SIREN's rule: a layer after sin(w0 z) has its weights divided by w0, which keeps every sine's argument
    of order one. Without it, stacked sines of w0 ~ 30 reach frequencies of 30^depth, which no one trains and
    whose float32 derivatives lose all digits whatever computes them."""
    if isinstance(previous_activation, torchjac.Sine):
        with torch.no_grad():
            linear.weight.div_(previous_activation.w0)


class _EncodedMLP(nn.Module):
    """A user-written field as NeRF and NeuS write one: an encoding loop [x, sin(c x), cos(c x)], the encoding
    (and cond) into the first layer, the encoding again into the skip layers, the first output scaled; or, with
    `modulated` layers, cond (one for all points) scaling and shifting those layers' outputs, as FiLM does."""

    def __init__(self, case: Case):
        super().__init__()
        self.bands, self.include_input, self.output_scale = case.bands, case.include_input, case.output_scale
        self.skips = case.skip_layers
        n_encoded = case.d_in * (int(case.include_input) + 2 * len(case.bands))
        self.concat_cond = not case.modulated
        sizes = [n_encoded + (case.cond_features if self.concat_cond else 0), *case.widths, case.d_out]
        self.modulated = case.modulated
        self.film = nn.ModuleDict({str(i): nn.Linear(case.cond_features, 2 * sizes[i + 1]) for i in case.modulated})
        self.linears = nn.ModuleList(
            nn.Linear(sizes[i] + (n_encoded if i in self.skips else 0), sizes[i + 1]) for i in range(len(sizes) - 1))
        self.activations = nn.ModuleList(copy.deepcopy(a) for a in case.activations)
        self.final = copy.deepcopy(case.final_activation) if case.final_activation is not None else nn.Identity()
        for previous, linear in zip(self.activations, self.linears[1:]):
            _siren_init(linear, previous)

    def forward(self, x, cond=None):
        parts = [x] if self.include_input else []
        for c in self.bands:
            parts += [torch.sin(x * c), torch.cos(x * c)]
        encoded = torch.cat(parts, -1)
        h = encoded if cond is None or not self.concat_cond else torch.cat([encoded, cond], -1)
        for i, linear in enumerate(self.linears):
            if i in self.skips:
                h = torch.cat([h, encoded], -1)
            h = linear(h)
            if i in self.modulated:
                gamma, beta = self.film[str(i)](cond).chunk(2, -1)
                h = h * (1 + gamma) + beta
            h = self.activations[i](h) if i < len(self.activations) else self.final(h)
        if self.output_scale is not None:
            h = torch.cat([h[..., :1] * self.output_scale, h[..., 1:]], -1)
        return h


def build_model(case: Case) -> nn.Module:
    """The model of a case, in float64; its float32 twin is built the same way."""
    torch.manual_seed(case.seed)
    if case.form == "encoded":
        return _EncodedMLP(case).double()
    if case.form == "point_mlp":
        act = copy.deepcopy(case.activations[0]) if case.activations else "identity"
        model = torchjac.PointMLP(case.d_in, list(case.widths), case.d_out, activation=act,
                                  cond_features=case.cond_features, skip_layers=case.skip_layers)
        for linear in model.layers[1:]:
            _siren_init(linear, model.activation)
        return model.double()
    sizes = [case.d_in + case.cond_features, *case.widths, case.d_out]
    layers = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(case.activations):
            layers.append(copy.deepcopy(case.activations[i]))
    if case.final_activation is not None:
        layers.append(copy.deepcopy(case.final_activation))
    return _sequential(case, layers).double()


def _as_function(model):
    """A plain function torchjac cannot lower: it takes the generic path."""
    def f(x, cond=None):
        return call_model(model, x, cond)
    return f


def _inputs(case: Case, dtype: torch.dtype):
    """x (maybe non-contiguous), cond, jvp v and Hutchinson noise, drawn in float64 from the case's seed."""
    gen = torch.Generator().manual_seed(case.seed)
    if case.non_contiguous:  # every other feature of a wider tensor, leading dims reversed
        wide = torch.randn(*case.lead[::-1], 2 * case.d_in, generator=gen, dtype=torch.float64).to(dtype)
        x = wide[..., ::2].permute(*reversed(range(len(case.lead))), len(case.lead))
    else:
        x = torch.randn(*case.lead, case.d_in, generator=gen, dtype=torch.float64).to(dtype)
    cond = None
    if case.cond_lead is not None:
        cond = torch.randn(*case.cond_lead, case.cond_features, generator=gen, dtype=torch.float64).to(dtype)
    v = torch.randn(*case.lead, case.d_in, generator=gen, dtype=torch.float64).to(dtype)
    noise = torch.randn(case.num_samples, *case.lead, case.d_in, generator=gen, dtype=torch.float64).to(dtype)
    return x, cond, v, noise


def _leaves(model, x, cond, v):
    named = {"x": x, "v": v, **({"cond": cond} if cond is not None else {})}
    named.update({f"param {n}": p for n, p in model.named_parameters()})
    for t in named.values():
        t.requires_grad_(True)
    return named


def _results(case: Case, model, x, cond, v, noise, loss_weights, oracle: bool):
    """{name: tensor} of every output and every gradient, by torchjac or (oracle=True) by autograd."""
    named = _leaves(model, x, cond, v)
    square = case.d_in == case.d_out
    f = _as_function(model) if case.form == "function" else model
    out = {}
    if oracle:
        y, jac = autograd_jacobian(model, x, cond)
        lead = jac.shape[:-2]
        outputs = {"jacobian": jac, "jvp": (jac @ v.expand(*lead, case.d_in).unsqueeze(-1)).squeeze(-1)}
        if square:
            outputs["divergence"] = jac.diagonal(0, -2, -1).sum(-1)
            e = noise.view(case.num_samples, *[1] * (len(lead) - len(case.lead)), *noise.shape[1:])
            e = e.expand(case.num_samples, *lead, case.d_in)
            outputs["hutchinson"] = torch.einsum("s...i,...ij,s...j->s...", e, jac, e).mean(0)
        ys = {name: y for name in outputs}
    else:
        ys, outputs = {}, {}
        ys["jacobian"], outputs["jacobian"] = torchjac.jacobian(f, x, cond=cond, return_output=True)
        ys["jvp"], outputs["jvp"] = torchjac.jvp(f, x, v, cond=cond, return_output=True)
        if square:
            ys["divergence"], outputs["divergence"] = torchjac.divergence(f, x, cond=cond, return_output=True)
            ys["hutchinson"], outputs["hutchinson"] = torchjac.divergence(
                f, x, cond=cond, estimator="hutchinson", noise=noise, return_output=True)
    for mode, result in outputs.items():
        out[f"{mode} value"], out[f"{mode} y"] = result, ys[mode]
        w_out, w_y = loss_weights(mode, result), loss_weights("y", ys[mode])
        loss = (w_out * result).sum() + (w_y * ys[mode]).sum()
        inputs = [t for name, t in named.items() if name != "v" or mode == "jvp"]
        names = [name for name in named if name != "v" or mode == "jvp"]
        grads = torch.autograd.grad(loss, inputs, allow_unused=True, retain_graph=True)
        for name, g, t in zip(names, grads, inputs):
            out[f"{mode} grad {name}"] = torch.zeros_like(t) if g is None else g
    return {k: t.detach().to(torch.float64) for k, t in out.items()}


def _loss_weights(seed):
    cache = {}

    def weights(mode, t):
        key = (mode, tuple(t.shape))
        if key not in cache:
            cache[key] = torch.randn(t.shape, generator=torch.Generator().manual_seed(seed + len(cache)),
                                     dtype=torch.float64)
        return cache[key].to(t.dtype)
    return weights


def _distance_to_derivative_jump(module: nn.Module, z: torch.Tensor) -> Optional[torch.Tensor]:
    """How far each pre-activation z is from where the activation's derivative jumps; None where it never does."""
    if isinstance(module, (nn.ReLU, nn.LeakyReLU, nn.ELU)):
        return z.abs()
    if isinstance(module, nn.Softplus):
        return (z * module.beta - module.threshold).abs() / module.beta
    return None


def _near_a_derivative_jump(model: nn.Module, x, cond) -> bool:
    """Whether a float64 pre-activation of the model lies within 1e-5 of its layer's scale (float32 rounding
    of z, with margin) of a jump in its activation's derivative."""
    near = []

    def record(module, inputs, output):
        z = inputs[0]
        distance = _distance_to_derivative_jump(module, z)
        if distance is not None and z.numel():
            near.append(bool((distance < 1e-5 * z.abs().max().clamp_min(1.0)).any()))

    handles = [m.register_forward_hook(record) for m in model.modules()
               if _distance_to_derivative_jump(m, torch.zeros(1)) is not None]
    try:
        with torch.no_grad():
            call_model(model, x, cond)
    finally:
        for handle in handles:
            handle.remove()
    return any(near)


def check(case: Case):
    """Assert every torchjac result of the case equals the float64 oracle (see the module docstring)."""
    # Built afresh for each use, never deep-copied: the older weight_norm cannot be (pytorch/pytorch#103001).
    def model_in(dtype):
        return build_model(case).to(dtype)

    model64, model = model_in(torch.float64), model_in(case.dtype)
    if case.form == "encoded":  # fused, unless it scales an output after a nonlinear activation (by other than 1)
        nonlinear_end = case.final_activation is not None and not isinstance(case.final_activation, nn.Identity)
        why = torchjac.explain(model64, cond=case.cond_lead is not None, ndim=len(case.lead) + 1)
        assert (why.path == "fused") == (case.output_scale in (None, 1.0) or not nonlinear_end), why
    if case.dtype == torch.float32:
        x64, cond64, _, _ = _inputs(case, torch.float64)
        assume(not _near_a_derivative_jump(model64, x64, cond64))
    expected = _results(case, model64, *_inputs(case, torch.float64), _loss_weights(case.seed), oracle=True)
    actual = _results(case, model_in(case.dtype), *_inputs(case, case.dtype), _loss_weights(case.seed),
                      oracle=False)
    pytorch32 = None
    if case.dtype == torch.float32:
        pytorch32 = _results(case, model, *_inputs(case, torch.float32), _loss_weights(case.seed), oracle=True)
    assert actual.keys() == expected.keys(), (sorted(actual), sorted(expected))
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        if want.numel() == 0:
            continue
        assert torch.isfinite(want).all(), f"{name}: the oracle is not finite; the case is out of range"
        scale = max(want.abs().max().item(), 1.0)
        error = (got - want).abs().max().item()
        if pytorch32 is None:
            bound = 1e-10 * scale
        else:
            bound = max(1e-5 * scale, 4 * (pytorch32[name] - want).abs().max().item())
        assert error <= bound, (f"{name}: max error {error:.3e} > bound {bound:.3e} (scale {scale:.3e}, "
                                f"{case.dtype})")


def _assert_close_to(got, want, what):
    scale = max(want.abs().max().item(), 1.0) if want.numel() else 1.0
    error = (got - want).abs().max().item() if want.numel() else 0.0
    assert error <= 1e-10 * scale, f"{what}: max error {error:.3e} (scale {scale:.3e})"


def check_func_jvp(case: Case):
    """torch.func.jvp over torchjac.jacobian equals it over the torch.func oracle, in float64."""
    model = build_model(case)
    f = _as_function(model) if case.form == "function" else model
    x, cond, v, _ = _inputs(case, torch.float64)
    y, tangent = torch.func.jvp(lambda x: torchjac.jacobian(f, x, cond=cond), (x,), (v,))
    y_ref, tangent_ref = torch.func.jvp(lambda x: oracle_jacobian(model, x, cond)[1], (x,), (v,))
    _assert_close_to(y, y_ref, "torch.func.jvp over jacobian: J")
    _assert_close_to(tangent, tangent_ref, "torch.func.jvp over jacobian: its tangent")


def check_compiled(case: Case):
    """A torch.compile'd jacobian and its gradients equal the eager call, in float64."""
    model = build_model(case)
    f = _as_function(model) if case.form == "function" else model
    x, cond, _, _ = _inputs(case, torch.float64)
    x.requires_grad_(True)
    leaves = [x, *model.parameters()]
    weights = _loss_weights(case.seed)

    def loss(x):
        jac = torchjac.jacobian(f, x, cond=cond)
        return (weights("jacobian", jac) * jac).sum(), jac

    def results(fn):
        value, jac = fn(x)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
        return [jac.detach()] + [torch.zeros_like(t) if g is None else g for g, t in zip(grads, leaves)]

    expected = results(loss)
    torch._dynamo.reset()  # a fresh cache: past the recompile limit dynamo would run eagerly
    # aot_eager: dynamo, the fake kernels and aot_autograd, which is what torchjac gives torch.compile;
    # inductor's code generation would add minutes, not checks of torchjac.
    for i, (got, want) in enumerate(zip(results(torch.compile(loss, backend="aot_eager")), expected)):
        _assert_close_to(got, want, "compiled jacobian" if i == 0 else f"compiled gradient {i - 1}")


def check_second_order(case: Case):
    """laplacian (exact, and Hutchinson with the case's noise) and hessian, their outputs and their gradients
    w.r.t. x, cond and every parameter, against nested create_graph autograd, in float64."""
    model = build_model(case).to(torch.float64)
    f = _as_function(model) if case.form == "function" else model
    x, cond, _, noise = _inputs(case, torch.float64)
    leaves = [x] + ([cond] if cond is not None else []) + list(model.parameters())
    for t in leaves:
        t.requires_grad_(True)
    y, hess = autograd_hessian(model, x, cond)
    lead = hess.shape[:-3]
    e = noise.view(case.num_samples, *[1] * (len(lead) - len(case.lead)), *noise.shape[1:])
    e = e.expand(case.num_samples, *lead, case.d_in)
    expected = {"laplacian": hess.diagonal(0, -2, -1).sum(-1), "hessian": hess,
                "laplacian hutchinson": torch.einsum("s...j,...ijk,s...k->...i", e, hess, e) / case.num_samples}
    actual = {"laplacian": torchjac.laplacian(f, x, cond=cond), "hessian": torchjac.hessian(f, x, cond=cond),
              "laplacian hutchinson": torchjac.laplacian(f, x, cond=cond, estimator="hutchinson", noise=noise)}
    weights = _loss_weights(case.seed)
    for name, want in expected.items():
        got = actual[name]
        assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(want.shape)}"
        _assert_close_to(got.detach(), want.detach(), name)
        w = weights(name, want)
        grads = [torch.autograd.grad((w * out).sum(), leaves, allow_unused=True, materialize_grads=True,
                                     retain_graph=True) for out in (got, want)]
        for i, (g, g_ref) in enumerate(zip(*grads)):
            _assert_close_to(g, g_ref, f"{name} gradient {i}")
