"""Recognizing user-written MLP modules with torch.fx, so they run on the fused ops.

A module is recognized when its traced forward is a chain of Linear layers and
supported activations, where a layer may read ``torch.cat`` (along the feature
dim) of the previous layer's output with the input ``x``, the condition ``cond``
and a frequency encoding of x (``sin(c x)``, ``cos(c x)``: NeRF, NeuS, IDR), in any
order, and values may be scaled by constants (NeuS divides its skip by sqrt(2)).
The module may return slices of its last layer's features, scaled and
concatenated (NeuS returns ``[sdf / scale, features]``). A layer may also be
written with the module's own parameters (``F.linear``, ``h @ W.t() + b``,
SIREN's BatchLinear), be scaled and shifted by values computed from cond alone
(FiLM, FFJORD's gates), take its weights from such values (FFJORD's hyper layer),
or mix Linear layers of one input (FFJORD's blend); the computations on cond are
recorded as the recipe's cond program (torchjac/cond_program.py).

The forward may branch on, or unpack, values computed from the input's shape alone (DeepSDF): those are
evaluated on meta tensors of the call's shapes (``_ShapeTracer``), and nodes the output never reads are
skipped, in-place ones excepted.

The result is a *recipe*: plain Python values naming the Linear submodules or
parameters, the column blocks each layer reads, the activation after it, the
constant scales, the encoding's frequencies, the output rows and the cond
program. The recipe holds no tensors; ``spec.from_recipe`` reads the parameters
and replays the cond program at call time. Anything else raises ``NotFusable``
naming the node that stopped it.
"""
import dataclasses
import inspect
import operator
from typing import NamedTuple, Optional, Tuple

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from . import activations as act
from .cond_program import COND_FUNCTIONS, COND_METHODS, FUNCTION_NAMES, SliceArg, ValueRef


class NotFusable(Exception):
    """The model is valid, but the fused MLP ops cannot express it; the message says why."""


class RecipeLayer(NamedTuple):
    module: str                           # qualified name of the nn.Linear (a description if weights are not one's)
    blocks: Tuple[Tuple[str, float], ...]  # the input columns in order: ("x" | "cond" | "h" | "enc<j>", scale)
    z_scale: float                        # z = z_scale * modulated(W @ input + b)
    activation: Tuple[int, float, float]  # code, p0, p1
    # Steps applied to W @ input + b before z_scale: ("mul" | "add", float or ("value", i)), where value i of
    # the recipe's cond program is a per-feature vector computed from cond (FiLM, FFJORD's gates).
    modulation: tuple = ()
    weight_value: Optional[Tuple[int, Optional[int]]] = None  # (weight, bias) values of the cond program
    parameters: Optional[Tuple[str, Optional[str]]] = None     # (weight, bias) parameters read by the forward
    # More Linear layers of the same input, mixed with the first: W h + b = sum_k c_k (W_k h + b_k) over
    # (module, *terms), c_k = term_coefs[k], a float or a cond program value (FFJORD's blend layer).
    terms: Tuple[str, ...] = ()
    term_coefs: Optional[tuple] = None


class Recipe(NamedTuple):
    layers: Tuple[RecipeLayer, ...]
    encoding: Tuple[Tuple[str, float], ...] = ()  # block "enc<j>" is kind(c x), (kind, c) = encoding[j]
    output_rows: Optional[Tuple[Tuple[int, float], ...]] = None  # (row, scale) of the last layer, None: all
    # What the forward computes from cond alone, step by step (see CondProgram): evaluated at each call on the
    # call's cond, which must then be one point shared by all, so its results fold into the weights.
    cond_program: tuple = ()


@dataclasses.dataclass
class _Layer:
    """A Linear layer being recognized; activation stays None until its use settles it."""
    module: str
    blocks: tuple
    z_scale: float = 1.0
    activation: Optional[Tuple[int, float, float]] = None
    modulation: list = dataclasses.field(default_factory=list)
    weight_value: Optional[Tuple[int, Optional[int]]] = None
    parameters: Optional[list] = None  # [weight name, bias name or None]
    terms: list = dataclasses.field(default_factory=list)  # sibling Linear layers of the same input
    term_coefs: Optional[tuple] = None


_IDENTITY = (int(act.Act.IDENTITY), 0.0, 0.0)


class _LayerOut(NamedTuple):
    index: int
    scale: float     # the value is scale * (activated or raw) output of layer `index`
    activated: bool
    combined: bool = False  # the mix of a layer with sibling Linear layers (_Combo), settled


class _Combo(NamedTuple):
    """Linear layers of one input mixed before any activation (FFJORD's blend: y0 + (y1 - y0) * t): coefs[k],
    a float or a cond program value (ValueRef), multiplies term k of layer `index`."""
    index: int
    coefs: tuple


class _Blocks(NamedTuple):
    """Input columns: (source, index, scale) per block, source "x", "cond", "h" (index: the layer) or "enc"
    (index: the encoding block)."""
    parts: tuple


class _Rows(NamedTuple):
    """Some features of layer `index`'s output, each scaled: ((row, scale), ...). Only the output may be so."""
    index: int
    rows: tuple
    activated: bool


class _Const(NamedTuple):
    """A tensor constant of one element (a frequency band): a Python number to the recipe."""
    value: float


class _ParamView(NamedTuple):
    """A parameter the forward reads itself (F.linear, SIREN's BatchLinear): as it is ("same"), transposed
    ("t") or as a row (bias.unsqueeze(-2))."""
    name: str
    view: str


class _CondValue(NamedTuple):
    """A tensor computed from cond (and parameters) alone: value `ref` of the cond program."""
    ref: int


class _Ones(NamedTuple):
    """torch.ones_like(a tensor): times a value, the value broadcast to every point (FFJORD's
    ``ones_like(x[:, :1]) * t``)."""
    node: str


class _UnitBatch(NamedTuple):
    """Input columns repeated along a new leading dim, one entry per unit (torchdiffeq's hypernetwork CNF:
    ``z.unsqueeze(0).repeat(width, 1, 1)``); width is None between the unsqueeze and the repeat."""
    blocks: "_Blocks"
    width: Optional[int]


class _UnitMajor(NamedTuple):
    """A layer's output laid out units first, (width, points, 1): ``matmul(Z, W)`` of a _UnitBatch with W
    (width, d, 1) computed from cond is the Linear layer of weight W[:, :, 0]."""
    out: _LayerOut
    width: int


class _UnitTerms(NamedTuple):
    """``matmul(h, U)`` of a _UnitMajor output with U (width, 1, d) computed from cond: the per-unit terms
    h_u U_u, which a sum (or mean) over the units makes the Linear layer of weight U[:, 0, :].t()."""
    out: _LayerOut
    weight: int  # the cond program value of U
    width: int


_UNIT_VALUES = (_UnitBatch, _UnitMajor, _UnitTerms)


class _Meta(NamedTuple):
    """A shape, a slice, a specialized argument or a guard on one: no feature values (why: what reading it as
    features would need)."""
    node: str
    why: str = ""


_SCALAR = (int, float)
_SIN = {torch.sin, "sin"}
_COS = {torch.cos, "cos"}
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, torch.true_divide, "div", "true_divide"}
_CAT = {torch.cat, torch.concat, "cat", "concat"}
_EXPAND = {"expand", "expand_as", "broadcast_to", torch.broadcast_to}
_ONES_LIKE = {torch.ones_like, "new_ones"}
_ADD = {operator.add, torch.add, "add"}
_SUB = {operator.sub, torch.sub, "sub"}
_LINEAR = {F.linear, "linear"}
_MATMUL = {operator.matmul, torch.matmul, torch.mm, "matmul", "mm"}
_UNSQUEEZE = {torch.unsqueeze, "unsqueeze"}
_REDUCE_UNITS = {torch.sum: "sum", "sum": "sum", torch.mean: "mean", "mean": "mean"}


_SHAPE = {"size", "dim", operator.getitem, getattr}
_SHAPE_ATTRIBUTES = ("shape", "ndim", "dtype", "device")
# What a branch may read of a tensor that the meta samples of _ShapeTracer do not have as the call's x does.
_DTYPE_ATTRIBUTES = ("dtype", "device", "is_cuda", "is_cpu", "is_meta", "is_sparse", "is_quantized", "layout")
_DTYPE_METHODS = ("type", "is_floating_point", "is_complex", "element_size", "get_device", "is_signed")
_DROPOUT = {F.dropout, torch.dropout, "dropout"}


def _functional_activation(target, args, kwargs):
    """(code, p0, p1) for a functional activation call, or None."""
    def arg(i, name, default):
        return args[i] if len(args) > i else kwargs.get(name, default)

    if target in (F.relu, torch.relu, "relu"):
        return act.Act.RELU, 0.0, 0.0
    if target in (F.leaky_relu, "leaky_relu"):
        return act.Act.LEAKY_RELU, float(arg(1, "negative_slope", 0.01)), 0.0
    if target in (F.softplus, "softplus"):
        return act.Act.SOFTPLUS, float(arg(1, "beta", 1.0)), float(arg(2, "threshold", 20.0))
    if target in (F.silu, "silu"):
        return act.Act.SILU, 0.0, 0.0
    if target in (F.gelu, "gelu"):
        return (act.Act.GELU_TANH if kwargs.get("approximate", "none") == "tanh" else act.Act.GELU), 0.0, 0.0
    if target in (torch.tanh, F.tanh, "tanh"):
        return act.Act.TANH, 0.0, 0.0
    if target in (torch.sigmoid, F.sigmoid, "sigmoid"):
        return act.Act.SIGMOID, 0.0, 0.0
    if target in (F.elu, "elu"):
        return act.Act.ELU, float(arg(1, "alpha", 1.0)), 0.0
    if target in (torch.sin, "sin"):
        return act.Act.SINE, 1.0, 0.0
    return None


def _scalar(value) -> Optional[float]:
    """value as a Python number when it is a constant scale, else None."""
    if isinstance(value, _SCALAR) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, _Const):
        return value.value
    return None


def _has_features(value) -> bool:
    """Whether value is, or holds, a feature tensor (anything but shapes, constants and guards)."""
    if isinstance(value, (_Blocks, _LayerOut, _Rows, _Combo) + _UNIT_VALUES):
        return True
    if isinstance(value, (list, tuple)) and not isinstance(value, (_Meta, _Const)):
        return any(_has_features(v) for v in value)
    if isinstance(value, dict):
        return any(_has_features(v) for v in value.values())
    return False


def _describe(value) -> str:
    """What a traced value is, in a user's words."""
    if isinstance(value, _ParamView):
        return {"same": f"the parameter {value.name!r}", "t": f"the transpose of the parameter {value.name!r}",
                "row": f"the parameter {value.name!r} as a row"}[value.view]
    if isinstance(value, _Meta):
        return f"{value.node!r} (a shape, a slice or a specialized argument)"
    if isinstance(value, _Ones):
        return "ones_like(...)"
    if isinstance(value, (_LayerOut, _Rows, _Combo) + _UNIT_VALUES):
        return "a layer's output"
    return type(value).__name__


def _flat(values) -> list:
    """values with the lists and plain tuples among them opened (torch.cat's list of tensors)."""
    out = []
    for v in values:
        if isinstance(v, list) or type(v) is tuple:
            out.extend(_flat(v))
        else:
            out.append(v)
    return out


def _from_cond_alone(value) -> bool:
    return isinstance(value, _CondValue) or (isinstance(value, _Blocks) and len(value.parts) == 1
                                             and value.parts[0][0] == "cond")


def _feature_slice(index, ndim: Optional[int]) -> Optional[slice]:
    """The slice of the feature dim that index takes, or None if it indexes anything else."""
    if not isinstance(index, tuple) or not index or not isinstance(index[-1], slice):
        return None
    lead = index[:-1]
    if lead == (Ellipsis,) or (ndim is not None and len(index) == ndim
                               and all(i == slice(None) for i in lead)):
        return index[-1]
    return None


class _Interpreter:
    def __init__(self, module: nn.Module, n_inputs: int, ndim: Optional[int], constants: dict,
                 cond_linears: bool = False, widths: Optional[dict] = None):
        self.module = module
        self.widths = widths or {}  # features of "x" and "cond" where the call's shapes are known
        self.cond_linears = cond_linears  # a Linear of cond alone computes a modulation, not a layer
        self.n_inputs = n_inputs    # 1 (x) or 2 (x, cond)
        self.ndim = ndim            # x.dim() of the call, which positive dims refer to
        self.constants = constants  # tensors torch.fx captured as constants, by attribute name
        self.layers = []            # _Layer, in call order
        self.consumed = set()       # layers whose activation is settled
        self.encoding = []          # (kind, c) of each encoding block
        self.program = []           # the cond program's steps

    def settle(self, out: _LayerOut, node) -> _Blocks:
        """The layer output as input columns; a raw output means the layer has no activation."""
        self.check_alone(out, node)
        layer = self.layers[out.index]
        if not out.activated:
            if out.index in self.consumed and layer.activation not in (None, _IDENTITY):
                raise NotFusable(f"node {node.name!r}: a layer's output is used both before and after "
                                 f"its activation")
            layer.activation = layer.activation or _IDENTITY
        self.consumed.add(out.index)
        return _Blocks((("h", out.index, out.scale),))

    def blocks(self, value, node) -> _Blocks:
        if isinstance(value, _Combo):
            value = self.finish(value, node)
        if isinstance(value, _LayerOut):
            return self.settle(value, node)
        if isinstance(value, _Blocks):
            return value
        if isinstance(value, _Rows):
            raise NotFusable(f"node {node.name!r}: a slice of a layer's features feeds another layer; only the "
                             f"module's output may be sliced")
        if isinstance(value, _CondValue):
            raise NotFusable(f"node {node.name!r} ({node.op} {_target_name(node)}): a tensor computed from cond "
                             f"(an encoding of cond, say) is read as features of a layer; the fused path reads cond "
                             f"itself, and folds what is computed from cond into the weights where it scales or "
                             f"shifts a layer's output or is its weight")
        if isinstance(value, _Meta):  # a slice of the input (its shape may be used, to expand cond)
            raise NotFusable(value.why or f"node {node.name!r} ({node.op} {_target_name(node)}): reads "
                             f"{value.node!r}, a slice or shape of a tensor, as features; the fused path reads whole "
                             f"inputs (x, cond) and their encoding")
        raise NotFusable(f"node {node.name!r} ({node.op} {_target_name(node)}): expected a feature tensor "
                         f"input, got {type(value).__name__}")

    def scale(self, value, factor, node):
        if isinstance(value, _Combo):
            return value._replace(coefs=tuple(self.coef("mul", c, factor, node) for c in value.coefs))
        if isinstance(value, _LayerOut):
            return value._replace(scale=value.scale * factor)
        if isinstance(value, _Rows):
            return value._replace(rows=tuple((r, s * factor) for r, s in value.rows))
        return _Blocks(tuple((src, i, s * factor) for src, i, s in self.blocks(value, node).parts))

    def linear(self, name, blocks: _Blocks, node, module_call: bool = False):
        index = len(self.layers)
        previous = self.layers[-1] if self.layers else None
        if (module_call and previous is not None and blocks.parts == previous.blocks and index - 1 not in self.consumed
                and previous.activation is None and not previous.modulation and previous.parameters is None
                and previous.weight_value is None and previous.term_coefs is None):
            # A second Linear of the previous one's input: a term of that layer, to be mixed with it.
            previous.terms.append(name)
            return _Combo(index - 1, (0.0,) * len(previous.terms) + (1.0,))
        for src, i, _ in blocks.parts:
            if src == "h" and i != index - 1:
                raise NotFusable(f"node {node.name!r}: Linear {name!r} reads the output of layer {i}, not of the "
                                 f"layer just before it; only skips of the input x (or its encoding) and cond "
                                 f"are fused")
        if index == 0 and any(src == "h" for src, _, _ in blocks.parts):
            raise NotFusable(f"node {node.name!r}: the first Linear must read x and cond only")
        if index > 0 and not any(src == "h" for src, _, _ in blocks.parts):
            raise NotFusable(f"node {node.name!r}: Linear {name!r} does not read the previous layer")
        self.layers.append(_Layer(name, blocks.parts))
        return _LayerOut(index, 1.0, False)

    def linear_from_parameters(self, node, blocks, weight: _ParamView, bias: Optional[_ParamView]):
        """h @ W.t() (+ b) or F.linear(h, W, b) with parameters the forward reads itself."""
        for p, views in ((weight, ("same",) if bias is not None or node.target in _LINEAR else ("t",)),
                         (bias, ("same", "row"))):
            if p is not None and (not isinstance(p, _ParamView) or p.view not in views):
                raise NotFusable(f"node {node.name!r}: {_target_name(node)} with {_describe(p)}, which is not a "
                                 f"Linear layer's weight (or bias) as nn.Linear applies it")
        w = self.module.get_parameter(weight.name)
        if w.dim() != 2 or (bias is not None and tuple(self.module.get_parameter(bias.name).shape) != (w.shape[0],)):
            raise NotFusable(f"node {node.name!r}: {_target_name(node)} with a weight of shape {tuple(w.shape)}"
                             f"{'' if bias is None else ' and a bias of shape '}"
                             f"{'' if bias is None else tuple(self.module.get_parameter(bias.name).shape)}; the "
                             f"fused path takes a 2-dim (out, in) weight and an (out,) bias")
        out = self.linear(weight.name, self.blocks(blocks, node), node)
        self.layers[-1].parameters = [weight.name, None if bias is None else bias.name]
        return out

    def add_bias(self, out: _LayerOut, bias: _ParamView, node) -> _LayerOut:
        """matmul(h, W.t()) + b: the bias of a layer built from parameters."""
        layer = self.layers[out.index]
        out_features = (self.module.get_parameter(layer.parameters[0]).shape[0]
                        if layer.parameters is not None else None)
        if (out.activated or out.index in self.consumed or layer.parameters is None or layer.parameters[1] is not None
                or layer.modulation or out.scale != 1.0 or bias.view not in ("same", "row")
                or self.module.get_parameter(bias.name).shape[-1] != out_features):
            raise NotFusable(f"node {node.name!r}: adds the parameter {bias.name!r} to a layer's output other than "
                             f"as the bias of h @ W.t()")
        layer.parameters[1] = bias.name
        return out

    def linear_from_cond(self, node, args, kwargs):
        """F.linear(h, W, b) with W and b computed from cond (FFJORD's hypernetwork layers)."""
        weight = args[1] if len(args) > 1 else kwargs.get("weight")
        bias = args[2] if len(args) > 2 else kwargs.get("bias")
        if not isinstance(weight, _CondValue) or not (bias is None or isinstance(bias, _CondValue)):
            raise NotFusable(f"node {node.name!r}: F.linear with a weight or bias that is neither computed from "
                             f"cond nor an nn.Linear's")
        out = self.linear("F.linear with weights from cond", self.blocks(args[0], node), node)
        self.layers[-1].weight_value = (weight.ref, None if bias is None else bias.ref)
        return out

    # -- Linear layers of one input, mixed (FFJORD's blend)

    def check_alone(self, out: _LayerOut, node):
        if not out.activated and self.layers[out.index].terms and not out.combined:
            raise NotFusable(f"node {node.name!r}: Linear {self.layers[out.index].module!r} shares its input with "
                             f"{self.layers[out.index].terms}, and its output is used on its own; the fused path "
                             f"folds Linear layers of one input only where they are mixed linearly before any "
                             f"activation")

    def as_combo(self, value, index: int) -> Optional[_Combo]:
        n_terms = 1 + len(self.layers[index].terms)
        if isinstance(value, _Combo) and value.index == index:
            return value._replace(coefs=value.coefs + (0.0,) * (n_terms - len(value.coefs)))
        if isinstance(value, _LayerOut) and value.index == index and not value.activated and not value.combined:
            return _Combo(index, (value.scale,) + (0.0,) * (n_terms - 1))
        return None

    def coef(self, op: str, a, b, node):
        """a op b for mixing coefficients: Python floats, or steps of the cond program."""
        if isinstance(a, float) and isinstance(b, float):
            return a + b if op == "add" else a - b if op == "sub" else a * b
        if op == "mul" and (a == 0.0 or b == 0.0):
            return 0.0
        if op in ("add", "sub") and b == 0.0:
            return a
        if op == "add" and a == 0.0:
            return b
        self.program.append(("function", op, (a, b), ()))
        return ValueRef(len(self.program) - 1)

    def combine(self, key, args, node) -> _Combo:
        index = next(a.index for a in args if isinstance(a, _Combo))
        a, b = (self.as_combo(v, index) for v in args)
        if key in _ADD | _SUB:
            if a is None or b is None:
                raise NotFusable(f"node {node.name!r}: {_target_name(node)} of Linear layers of one input and "
                                 f"something else; the fused path mixes such layers only with each other")
            op = "add" if key in _ADD else "sub"
            return _Combo(index, tuple(self.coef(op, p, q, node) for p, q in zip(a.coefs, b.coefs)))
        combo, other = (a, args[1]) if a is not None else (b, args[0])
        factor = _scalar(other)
        if factor is None:
            value = self.as_cond_value(other)
            if value is None:
                raise NotFusable(f"node {node.name!r}: mixes Linear layers of one input by something that is "
                                 f"neither a constant nor computed from cond")
            factor = ValueRef(value.ref)
        return _Combo(index, tuple(self.coef("mul", c, factor, node) for c in combo.coefs))

    def finish(self, combo: _Combo, node) -> _LayerOut:
        """The mix settled: the layer's terms get their coefficients."""
        layer = self.layers[combo.index]
        if layer.term_coefs is not None:
            where = f"node {node.name!r}" if node is not None else "output"
            raise NotFusable(f"{where}: Linear layers of one input are mixed in two ways")
        layer.term_coefs = self.as_combo(combo, combo.index).coefs
        return _LayerOut(combo.index, 1.0, False, True)

    def activation(self, value, encoded, node):
        if isinstance(value, _Combo):
            value = self.finish(value, node)
        if isinstance(value, _LayerOut) and not value.activated:
            self.check_alone(value, node)
        if not isinstance(value, _LayerOut) or value.activated:
            raise NotFusable(f"node {node.name!r}: an activation must directly follow a Linear layer")
        layer = self.layers[value.index]
        if value.index in self.consumed or layer.activation is not None:
            raise NotFusable(f"node {node.name!r}: a layer's output is used both before and after its activation")
        layer.z_scale *= value.scale  # a constant before the activation folds into the layer
        layer.activation = (int(encoded[0]), float(encoded[1]), float(encoded[2]))
        return _LayerOut(value.index, 1.0, True)

    def encode(self, kind: str, value, node) -> _Blocks:
        """sin(c x) or cos(c x): a block of the input encoding."""
        parts = value.parts if isinstance(value, _Blocks) else ()
        if len(parts) != 1 or parts[0][0] != "x":
            raise NotFusable(f"node {node.name!r}: {kind} of something other than the input x times a constant; "
                             f"the fused path encodes x alone, as sin(c x) and cos(c x) (a frequency encoding)")
        block = (kind, parts[0][2])
        if block not in self.encoding:
            self.encoding.append(block)
        return _Blocks((("enc", self.encoding.index(block), 1.0),))

    # -- values computed from cond alone

    def as_cond_value(self, value) -> Optional[_CondValue]:
        """value as a cond program value if it is computed from cond alone, else None."""
        if isinstance(value, _CondValue):
            return value
        if isinstance(value, _Blocks) and len(value.parts) == 1 and value.parts[0][0] == "cond":
            self.program.append(("cond", value.parts[0][2], (), ()))
            return _CondValue(len(self.program) - 1)
        return None

    def program_arg(self, a, node):
        if isinstance(a, (ValueRef, SliceArg)):
            return a
        if isinstance(a, _ParamView):  # a parameter read by the computation on cond
            self.program.append(("parameter", a.name, (a.view,), ()))
            return ValueRef(len(self.program) - 1)
        if isinstance(a, (_Meta, _Ones, _Rows, _LayerOut, _Combo)):
            raise NotFusable(f"node {node.name!r}: a computation on cond reads {_describe(a)}, which torchjac "
                             f"cannot replay from cond alone")
        if isinstance(a, (_CondValue, _Blocks)):
            value = self.as_cond_value(a)
            if value is None:
                raise NotFusable(f"node {node.name!r}: mixes x into a computation on cond")
            return ValueRef(value.ref)
        if isinstance(a, slice):
            bounds = (a.start, a.stop, a.step)
            if not all(b is None or (isinstance(b, int) and not isinstance(b, bool)) for b in bounds):
                raise NotFusable(f"node {node.name!r}: a computation on cond slices with bounds computed from a "
                                 f"tensor's shape, which torchjac cannot replay")
            return SliceArg(*bounds)
        if isinstance(a, (list, tuple)):
            return tuple(self.program_arg(b, node) for b in a)
        if isinstance(a, _Const):
            return a.value
        if a is None or a is Ellipsis or isinstance(a, (bool, int, float, str, torch.dtype)):
            return a
        raise NotFusable(f"node {node.name!r}: a computation on cond reads {type(a).__name__} "
                         f"({a!r:.60}), which torchjac cannot replay")

    def record(self, kind, target, args, kwargs, node) -> _CondValue:
        """A step of the cond program: replayed at each call, never evaluated here."""
        self.program.append((kind, target, self.program_arg(tuple(args), node),
                             tuple((k, self.program_arg(v, node)) for k, v in kwargs.items())))
        return _CondValue(len(self.program) - 1)

    def cond_step(self, node, key, args, kwargs) -> Optional[_CondValue]:
        """The cond program step of a call on values computed from cond alone, or None if it reads x."""
        values = [a for a in _flat(list(args) + list(kwargs.values()))
                  if _has_features(a) or isinstance(a, _CondValue)]
        if not values or not all(_from_cond_alone(a) for a in values):
            return None
        if not any(isinstance(a, _CondValue) for a in values) and (
                key in _CAT | _EXPAND | _MUL | _DIV | _ONES_LIKE or key in (operator.getitem, "__getitem__")):
            return None  # cond as features: concatenated, expanded, scaled, as before
        if node.op == "call_function":
            name = FUNCTION_NAMES.get(key)
            if name is None:
                raise NotFusable(f"node {node.name!r}: computes {_target_name(node)} of cond, which torchjac "
                                 f"does not replay (it replays {sorted(COND_FUNCTIONS)})")
            return self.record("function", name, args, kwargs, node)
        if key not in COND_METHODS:
            raise NotFusable(f"node {node.name!r}: calls .{key}() on a tensor computed from cond, which torchjac "
                             f"does not replay (it replays {sorted(COND_METHODS)})")
        return self.record("method", key, args, kwargs, node)

    def modulate(self, out: _LayerOut, op: str, value: _CondValue, node) -> _LayerOut:
        """A layer's raw output times, or plus, a vector computed from cond (FiLM, FFJORD's gates)."""
        if isinstance(out, _Combo):
            out = self.finish(out, node)
        self.check_alone(out, node)
        if out.activated or out.index in self.consumed:
            raise NotFusable(f"node {node.name!r}: modulates a layer's output after its activation or after "
                             f"another use; the fused path folds cond's scale and shift into the layer itself")
        layer = self.layers[out.index]
        if out.scale != 1.0:
            layer.modulation.append(("mul", out.scale))
        layer.modulation.append((op, ValueRef(value.ref)))
        return _LayerOut(out.index, 1.0, False, out.combined)

    # -- torchdiffeq's hypernetwork CNF: one unit per entry of a batch dim

    def unit_step(self, node, key, args, kwargs, encoded):
        """A step of ``matmul(tanh(matmul(z.unsqueeze(0).repeat(width, 1, 1), W) + B), U).mean(0)`` with W,
        B, U computed from cond: two Linear layers written as per-unit batched products. None if node has
        no part in such a chain."""
        values = _flat(list(args) + list(kwargs.values()))
        if not any(isinstance(a, _UNIT_VALUES) for a in values):
            dim = args[1] if len(args) > 1 else kwargs.get("dim")
            if key in _UNSQUEEZE and args and isinstance(args[0], _Blocks) and dim == 0 and self.ndim == 2:
                return _UnitBatch(args[0], None)
            return None
        first = args[0] if args else None
        other = args[1] if len(args) > 1 else None
        if isinstance(first, _UnitBatch) and first.width is None and key in ("repeat", "expand") and not kwargs:
            sizes = tuple(args[1]) if len(args) == 2 and isinstance(args[1], (tuple, list)) else tuple(args[1:])
            rest = (1, 1) if key == "repeat" else (-1, -1)
            if len(sizes) == 3 and isinstance(sizes[0], int) and sizes[0] > 0 and sizes[1:] == rest:
                return first._replace(width=sizes[0])
        if key in _MATMUL and not kwargs and isinstance(other, _CondValue):
            if isinstance(first, _UnitBatch) and first.width is not None:  # Z @ W, W (width, d, 1)
                # expand, then squeeze: W (1, d, 1) shared by the units is fine, and any other shape stays
                # 3-dim (refused when the recipe is lowered), never reinterpreted as a reshape would
                spread = self.record("method", "expand", (other, first.width, -1, -1), {}, node)
                weight = self.record("method", "squeeze", (spread, -1), {}, node)
                out = self.linear("matmul with per-unit weights from cond", first.blocks, node)
                self.layers[-1].weight_value = (weight.ref, None)
                return _UnitMajor(out, first.width)
            if isinstance(first, _UnitMajor):  # h @ U, U (width, 1, d)
                return _UnitTerms(first.out, other.ref, first.width)
        if key in _ADD and not kwargs and len(args) == 2:
            unit, value = (first, other) if isinstance(first, _UnitMajor) else (other, first)
            if isinstance(unit, _UnitMajor) and isinstance(value, _CondValue):  # + B, B (width, 1, 1)
                spread = self.record("method", "expand", (value, unit.width, 1, 1), {}, node)  # B (1, 1, 1) too
                bias = self.record("method", "reshape", (spread, unit.width), {}, node)
                return unit._replace(out=self.modulate(unit.out, "add", bias, node))
        if encoded is not None and isinstance(first, _UnitMajor):
            return first._replace(out=self.activation(first.out, encoded, node))
        if key in _REDUCE_UNITS and isinstance(first, _UnitTerms):
            dim = other if other is not None else kwargs.get("dim")
            if dim in (0, (0,), [0]) and not kwargs.get("keepdim", False) and len(args) <= 2:
                u = ValueRef(first.weight)
                spread = self.record("method", "expand", (u, first.width, -1, -1), {}, node)
                weight = self.record("method", "transpose", (self.record("method", "squeeze", (spread, 1), {}, node),
                                                             -1, -2), {}, node)
                if _REDUCE_UNITS[key] == "mean":
                    weight = self.record("function", "truediv", (weight, float(first.width)), {}, node)
                out = self.linear("matmul with per-unit weights from cond, summed over the units",
                                  self.blocks(first.out, node), node)
                self.layers[-1].weight_value = (weight.ref, None)
                return out
        raise NotFusable(f"node {node.name!r}: {_target_name(node)} of a per-unit batch (the layout of "
                         f"z.unsqueeze(0).repeat(width, 1, 1)); the fused path follows matmul(Z, W) + B with W "
                         f"(width, d, 1) and B (width, 1, 1) computed from cond, an activation, matmul(h, U) with U "
                         f"(width, 1, d) from cond, and a sum or mean over dim 0, only")

    def dropout(self, node, args, kwargs):
        """F.dropout / torch.dropout: the identity in eval mode (training=False) or with p=0."""
        functional = node.target is F.dropout
        p = args[1] if len(args) > 1 else kwargs.get("p", 0.5)
        training = args[2] if len(args) > 2 else kwargs.get("training" if functional else "train", functional)
        if not isinstance(training, bool) or not isinstance(p, _SCALAR):
            raise NotFusable(f"node {node.name!r}: dropout with p={p!r}, training={training!r}, which are not "
                             f"Python values when traced")
        if training and p > 0:
            raise NotFusable(f"node {node.name!r}: dropout in training mode (p={p}) draws a random mask per call; "
                             f"the generic path computes it, or call model.eval() for the fused path")
        return args[0]

    def feature_dim(self, dim) -> bool:
        return dim == -1 or (self.ndim is not None and dim == self.ndim - 1)

    def out_features(self, index: int, node) -> int:
        if self.layers[index].parameters is not None:
            return self.module.get_parameter(self.layers[index].parameters[0]).shape[0]
        if self.layers[index].weight_value is not None:
            raise NotFusable(f"node {node.name!r}: slices the output of a layer whose weights are computed from "
                             f"cond")
        return self.module.get_submodule(self.layers[index].module).out_features

    def rows(self, value, index, node) -> _Rows:
        """The features a getitem takes from a layer's output."""
        s = _feature_slice(index, self.ndim)
        if s is None:
            raise NotFusable(f"node {node.name!r}: indexes a layer's output with {index!r}, which is not a slice "
                             f"of its features (the last dim)")
        return self.as_rows(value, s, node)

    def as_rows(self, value: _LayerOut, s: slice, node) -> _Rows:
        if value.activated:
            self.consumed.add(value.index)
        else:
            self.settle(value, node)
        rows = range(self.out_features(value.index, node))[s]
        return _Rows(value.index, tuple((r, value.scale) for r in rows), value.activated)

    def cat(self, parts, node):
        """torch.cat of input columns, or of slices of one layer's output (the module's output)."""
        if any(isinstance(p, _Rows) for p in parts):
            as_rows = [p if isinstance(p, _Rows) else self.as_rows(p, slice(None), node)
                       if isinstance(p, _LayerOut) else None for p in parts]
            if any(r is None for r in as_rows) or len({(r.index, r.activated) for r in as_rows}) != 1:
                raise NotFusable(f"node {node.name!r}: concatenates slices of a layer's output with something "
                                 f"else; only slices of the last layer's features may be put together")
            return _Rows(as_rows[0].index, tuple(r for p in as_rows for r in p.rows), as_rows[0].activated)
        return _Blocks(tuple(b for part in parts for b in self.blocks(part, node).parts))

    def slice_blocks(self, value: _Blocks, index, node):
        """The whole blocks a slice of input columns takes (DeepSDF's input[:, :-3] of cat([latent, xyz])); any
        other slice as a _Meta, which may give a shape (FFJORD's ones_like(x[:, :1]))."""
        def width(src, i):
            if src == "h":
                return self.out_features(i, node)
            return self.widths.get("x" if src == "enc" else src)

        s = _feature_slice(index, self.ndim)
        widths = [width(src, i) for src, i, _ in value.parts]
        if s is None or None in widths:
            return _Meta(node.name, f"node {node.name!r}: indexes input columns with {index!r}; the fused path "
                                    f"reads slices of the feature dim that are whole inputs (x, cond), with the "
                                    f"call's shapes known")
        starts = [sum(widths[:k]) for k in range(len(widths) + 1)]
        columns = range(starts[-1])[s]
        first = starts.index(columns[0]) if len(columns) and columns[0] in starts else None
        last = starts.index(columns[-1] + 1) if len(columns) and columns[-1] + 1 in starts else None
        if first is None or last is None or columns.step != 1:
            return _Meta(node.name, f"node {node.name!r}: reads columns {columns.start}..{columns.stop - 1} of "
                                    f"input columns made of blocks {[src for src, _, _ in value.parts]} of widths "
                                    f"{widths} as features; the fused path reads whole blocks (x, cond, a layer's "
                                    f"output), not parts of one")
        return _Blocks(value.parts[first:last])

    def parameter_view(self, value) -> Optional[_ParamView]:
        """value as a view of one of the module's parameters (torch.fx bakes views the forward takes of
        parameters it reads through a dict, as BatchLinear does), or None."""
        for name, p in self.module.named_parameters():
            base = value._base if value._base is not None else value
            if base is not p or value.data_ptr() != p.data_ptr():
                continue
            if value.shape == p.shape and value.stride() == p.stride():
                return _ParamView(name, "same")
            if p.dim() == 2 and value.shape == p.shape[::-1] and value.stride() == p.stride()[::-1]:
                return _ParamView(name, "t")
            if p.dim() == 1 and value.shape == (1, p.shape[0]) and value.stride()[-1] == p.stride(0):
                return _ParamView(name, "row")
        return None

    def constant(self, node):
        try:
            parameter = self.module.get_parameter(node.target)
        except AttributeError:
            parameter = None
        if parameter is not None:
            return _ParamView(node.target, "same")
        value = self.constants.get(node.target)
        if value is not None and (view := self.parameter_view(value)) is not None:
            return view
        if value is None:
            raise NotFusable(f"node {node.name!r}: the forward reads the tensor {node.target!r} (a parameter or "
                             f"buffer) outside any Linear layer; the fused path reads only Linear layers' "
                             f"parameters, so the generic path computes this model, exactly")
        if value.numel() != 1 or value.requires_grad:
            raise NotFusable(f"node {node.name!r}: the forward uses the tensor {node.target!r} of shape "
                             f"{tuple(value.shape)} outside any nn.Linear layer; the fused path reads tensors only "
                             f"as nn.Linear parameters, and constants of one element as scales (frequency bands in "
                             f"a loop, as NeRF's embedder)")
        return _Const(float(value))

    def run(self, graph: torch.fx.Graph):
        env = {}
        placeholders = 0
        result = None
        used = _used_nodes(graph)
        for node in graph.nodes:
            if node not in used:  # computes nothing the output reads (DeepSDF's unused xyz = input[:, -3:])
                continue
            def val(a):
                return env[a.name] if isinstance(a, torch.fx.Node) else a
            args = [torch.fx.node.map_arg(a, val) for a in node.args]
            kwargs = {k: torch.fx.node.map_arg(v, val) for k, v in node.kwargs.items()}
            target = node.target
            if node.op == "placeholder":
                # After x (and cond): the specialized arguments and **kwargs, which carry no features.
                env[node.name] = (_Blocks(((("x", "cond")[placeholders], 0, 1.0),))
                                  if placeholders < self.n_inputs else _Meta(node.name))
                placeholders += 1
            elif node.op == "call_module" and (any(isinstance(a, _CondValue) for a in args) or (
                    self.cond_linears and args and _from_cond_alone(args[0]))):
                # a module applied to something computed from cond (FFJORD's hyper layers): replayed per call
                env[node.name] = self.record("module", target, args, kwargs, node)
            elif node.op == "call_module":
                sub = self.module.get_submodule(target)
                encoded = act.encode(sub)
                # computes_as: a subclass with its own forward can be a leaf here too (a parametrized
                # module's class lives in torch.nn), and it does not compute what the base class does.
                if act.computes_as(sub, nn.Linear):
                    env[node.name] = self.linear(target, self.blocks(args[0], node), node, module_call=True)
                elif act.computes_as(sub, nn.Identity) or (act.computes_as(sub, nn.Dropout) and not sub.training):
                    env[node.name] = args[0]
                elif encoded is not None and isinstance(args[0], _UnitMajor):
                    env[node.name] = args[0]._replace(out=self.activation(args[0].out, encoded, node))
                elif encoded is not None:
                    env[node.name] = self.activation(args[0], encoded, node)
                else:
                    raise NotFusable(f"node {node.name!r}: module {target!r} ({type(sub).__name__}) is not a "
                                     f"Linear layer or supported activation")
            elif node.op in ("call_function", "call_method"):
                key = target if node.op == "call_function" else str(target)
                encoded = _functional_activation(key, args, kwargs)
                cond_args = any(isinstance(a, _CondValue) for a in _flat(list(args) + list(kwargs.values())))
                if (unit := self.unit_step(node, key, args, kwargs, encoded)) is not None:
                    env[node.name] = unit
                elif key in ("t", torch.t) and len(args) == 1 and isinstance(args[0], _ParamView) and args[0].view in (
                        "same", "t"):  # W.t(), as h @ W.t() takes a Linear's weight
                    env[node.name] = args[0]._replace(view="t" if args[0].view == "same" else "same")
                elif (key is getattr and args[1] in _SHAPE_ATTRIBUTES) or key in ("size", "dim"):
                    env[node.name] = _Meta(node.name)  # a shape: the meta-evaluated branches are its only use
                elif key in _DROPOUT:
                    env[node.name] = self.dropout(node, args, kwargs)
                elif key in _ONES_LIKE:
                    env[node.name] = _Ones(node.name)
                elif not cond_args and not _has_features(args) and not _has_features(kwargs):
                    # shapes, guards on specialized arguments; why any slice of the input in them is not features
                    why = [a.why for a in _flat(list(args) + list(kwargs.values())) if isinstance(a, _Meta) and a.why]
                    env[node.name] = _Meta(node.name, why[0] if why else "")
                elif (step := self.cond_step(node, key, args, kwargs)) is not None:
                    env[node.name] = step
                elif kwargs and key in _ADD | _SUB | _MUL | _DIV | _SIN | _COS | _MATMUL:
                    raise NotFusable(f"node {node.name!r}: {_target_name(node)} with {', '.join(sorted(kwargs))}=; "
                                     f"the fused path folds the plain operation only")
                elif key in _ADD | _SUB | _MUL and len(args) == 2 and any(isinstance(a, _Combo) for a in args):
                    env[node.name] = self.combine(key, args, node)
                elif key in _MUL | _ADD and len(args) == 2 and cond_args and any(
                        isinstance(a, _LayerOut) for a in args):
                    out, value = (args[0], args[1]) if isinstance(args[0], _LayerOut) else (args[1], args[0])
                    env[node.name] = self.modulate(out, "mul" if key in _MUL else "add", value, node)
                elif key in _LINEAR and cond_args:
                    env[node.name] = self.linear_from_cond(node, args, kwargs)
                elif key in _LINEAR:
                    weight = args[1] if len(args) > 1 else kwargs.get("weight")
                    bias = args[2] if len(args) > 2 else kwargs.get("bias")
                    env[node.name] = self.linear_from_parameters(node, args[0], weight, bias)
                elif key in _MATMUL and len(args) == 2 and isinstance(args[1], _ParamView):
                    env[node.name] = self.linear_from_parameters(node, args[0], args[1], None)
                elif key in _ADD and len(args) == 2 and isinstance(args[0], _LayerOut) and isinstance(
                        args[1], _ParamView):
                    env[node.name] = self.add_bias(args[0], args[1], node)
                elif key in _SIN | _COS and isinstance(args[0], _Blocks):
                    env[node.name] = self.encode("sin" if key in _SIN else "cos", args[0], node)
                elif encoded is not None:
                    env[node.name] = self.activation(args[0], encoded, node)
                elif key in _CAT:
                    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                    if not self.feature_dim(dim):
                        rank = f" of {self.ndim}-dim x" if self.ndim is not None else ""
                        raise NotFusable(f"node {node.name!r}: torch.cat along dim {dim}{rank}; the fused path needs "
                                         f"the feature dim (-1)")
                    env[node.name] = self.cat(args[0], node)
                elif key in _MUL and len(args) == 2 and any(isinstance(a, _Ones) for a in args):
                    env[node.name] = args[1] if isinstance(args[0], _Ones) else args[0]
                elif key in _MUL | _DIV and len(args) == 2:
                    a, b = args
                    if _scalar(b) is not None:
                        factor, value = (1.0 / _scalar(b) if key in _DIV else _scalar(b)), a
                    elif _scalar(a) is not None and key in _MUL:
                        factor, value = _scalar(a), b
                    elif any(isinstance(v, _ParamView) for v in args):
                        name = next(v.name for v in args if isinstance(v, _ParamView))
                        raise NotFusable(f"node {node.name!r}: {_target_name(node)} by the parameter {name!r}; the "
                                         f"fused path folds constant scales only (a trainable scale or frequency "
                                         f"runs on the generic path)")
                    else:
                        raise NotFusable(f"node {node.name!r}: {_target_name(node)} of two tensors; only scaling "
                                         f"by a constant is fused")
                    env[node.name] = self.scale(value, factor, node)
                elif key in _EXPAND:
                    env[node.name] = args[0]
                elif key in (operator.getitem, "__getitem__") and isinstance(args[0], _LayerOut):
                    env[node.name] = self.rows(args[0], args[1], node)
                elif key in (operator.getitem, "__getitem__") and isinstance(args[0], _Blocks):
                    env[node.name] = self.slice_blocks(args[0], args[1], node)
                elif key in _SHAPE:
                    env[node.name] = _Meta(node.name)
                else:
                    raise NotFusable(f"node {node.name!r}: {node.op} {_target_name(node)} is not part of a "
                                     f"Linear/activation chain")
            elif node.op == "output":
                result = args[0]
            elif node.op == "get_attr":
                env[node.name] = self.constant(node)
            else:
                raise NotFusable(f"node {node.name!r}: {node.op} {target!r} is not supported")
        return result

    def recipe(self, result, node_name="output"):
        if isinstance(result, _Combo):
            result = self.finish(result, None)
        rows = None
        if isinstance(result, _Rows) and result.index == len(self.layers) - 1:
            rows, result = result.rows, _LayerOut(result.index, 1.0, result.activated)
        if not isinstance(result, _LayerOut) or result.index != len(self.layers) - 1:
            raise NotFusable(f"{node_name}: the module must return the output of its last Linear layer "
                             f"(or its activation, or slices of its features)")
        last = self.layers[-1]
        if last.activation is None:
            last.activation = _IDENTITY
        if result.scale != 1.0:
            if result.activated and last.activation != _IDENTITY:
                raise NotFusable(f"{node_name}: the output is scaled after a nonlinear activation")
            last.z_scale *= result.scale
        if rows is not None and last.activation != _IDENTITY and any(s != 1.0 for _, s in rows):
            raise NotFusable(f"{node_name}: slices of the output are scaled after a nonlinear activation")
        if any(layer.activation is None for layer in self.layers):
            raise NotFusable("a Linear layer's output is not used by the next layer")
        for layer in self.layers:
            if layer.terms and layer.term_coefs is None:
                raise NotFusable(f"Linear {layer.module!r} shares its input with {layer.terms}, which are not mixed "
                                 f"with it linearly; the fused path reads one Linear layer (or such a mix) per layer")

        def source(src, i):
            return f"enc{i}" if src == "enc" else src

        layers = tuple(RecipeLayer(layer.module, tuple((source(src, i), float(k)) for src, i, k in layer.blocks),
                                   float(layer.z_scale), layer.activation, tuple(layer.modulation), layer.weight_value,
                                   None if layer.parameters is None else tuple(layer.parameters), tuple(layer.terms),
                                   layer.term_coefs)
                       for layer in self.layers)
        return Recipe(layers, tuple(self.encoding), rows, tuple(self.program))


_IN_PLACE_FUNCTIONS = {operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv}


def _used_nodes(graph: torch.fx.Graph) -> set:
    """The nodes the output reads, and any that may change a tensor in place (never skipped: they are refused)."""
    def in_place(node):
        name = _target_name(node)
        return node.op == "output" or node.target in _IN_PLACE_FUNCTIONS or "out" in node.kwargs or (
            node.op in ("call_method", "call_function") and name.endswith("_") and not name.startswith("__"))

    used, stack = set(), [n for n in graph.nodes if in_place(n)]
    while stack:
        node = stack.pop()
        if node not in used:
            used.add(node)
            stack.extend(node.all_input_nodes)
    return used


def _target_name(node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


# Point counts at which a value computed from shapes is evaluated: it must not depend on them.
_SAMPLE_POINTS = (5, 7)


class _ShapeTracer(torch.fx.Tracer):
    """torch.fx's tracer, which may also take a branch or unpack a sequence that depends on shapes alone (DeepSDF's
    ``if input.shape[1] > 3``, ``latent.expand(*xyz.shape[:-1], n)``).

    Such a value is evaluated on meta tensors of the call's shapes at two numbers of points, and at the call's
    own where it is known (not under torch.compile, whose recipe serves every number of points), so a value of a
    tensor is never read. It is refused where the shapes are not known or it differs between those.
    """

    def __init__(self, root: nn.Module, shapes, call=None):
        super().__init__()
        self.root = root
        # shapes: one tuple per input (x, cond), None for the dims that count points; None: unknown.
        # call: the call's own shapes, or None.
        samples = [] if shapes is None else [[[n if d is None else d for d in shape] for shape in shapes]
                                             for n in _SAMPLE_POINTS]
        if shapes is not None and call is not None:
            samples.append(call)
        self.samples = [[torch.empty(shape, device="meta") for shape in sample] for sample in samples] or None

    def proxy(self, node):
        return _ShapeProxy(node, self)

    def to_bool(self, obj):
        return bool(self._evaluate(obj.node, "branches on", bool))

    def iter(self, obj):
        return iter([obj[i] for i in range(self._evaluate(obj.node, "iterates over", len))])

    def _evaluate(self, node, verb: str, fn):
        if self.samples is None:
            raise NotFusable(f"node {node.name!r}: the forward {verb} a value computed from the shape of its "
                             f"input; explain(f, x) with an example input, or the call itself, tells whether the "
                             f"fused path serves that shape")
        values = []
        for sample in self.samples:
            try:
                values.append(fn(self._meta_value(node, sample, {})))
            except NotFusable:
                raise
            except Exception as e:
                raise NotFusable(f"node {node.name!r}: the forward {verb} a value that is not computed from "
                                 f"shapes alone ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                                 f"the fused path needs control flow that is the same for every point") from None
        if any(v != values[0] for v in values):
            raise NotFusable(f"node {node.name!r}: the forward {verb} a value that depends on the number of points "
                             f"({', '.join(map(repr, values))} for {len(values)} numbers of points); the fused path "
                             f"needs control flow that is the same for every number of points")
        return values[0]

    @staticmethod
    def _dtype_refusal(node, what: str) -> str:
        # The samples are meta tensors of the default dtype: a branch on x.dtype or x.device would be taken for
        # them, not for the call's x.
        return (f"node {node.name!r}: the forward's control flow reads {what} of a tensor, which torchjac does not "
                f"evaluate at recognition; the generic path runs the forward as written")

    def _meta_value(self, node, sample, env):
        if node.name in env:
            return env[node.name]
        args, kwargs = torch.fx.node.map_arg((node.args, node.kwargs),
                                             lambda n: self._meta_value(n, sample, env))
        if node.op == "placeholder":
            index = [n for n in self.graph.nodes if n.op == "placeholder"].index(node)
            if index >= len(sample):
                raise NotFusable(f"node {node.name!r}: control flow on the argument {node.target!r}, which "
                                 f"torchjac does not pass")
            value = sample[index]
        elif node.op == "get_attr":
            value = operator.attrgetter(node.target)(self.root)
            value = value.to("meta") if torch.is_tensor(value) else value
        elif node.op == "call_function":
            if node.target is getattr and node.args[1] in _DTYPE_ATTRIBUTES:
                raise NotFusable(self._dtype_refusal(node, f".{node.args[1]}"))
            value = node.target(*args, **kwargs)
        elif node.op == "call_method":
            if node.target in _DTYPE_METHODS:
                raise NotFusable(self._dtype_refusal(node, f".{node.target}()"))
            value = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:  # a module's call would be traced again, and modules rarely compute shapes
            raise NotFusable(f"node {node.name!r}: control flow on the output of the module {node.target!r}")
        env[node.name] = value
        return value


class _ShapeProxy(torch.fx.Proxy):
    """A proxy whose len() is evaluated as _ShapeTracer's branches are (``*shape[:-1]`` asks for it)."""

    def __len__(self):
        return self.tracer._evaluate(self.node, "takes the length of", len)


def _trace(module: nn.Module, concrete: dict, shapes=None, call=None):
    """(graph, constants): torch.fx's graph of module and the tensor constants it captured, by name.

    torch.fx keeps a tensor it meets that is no parameter or buffer (a frequency band held by a plain
    object) by assigning it to the module as ``_tensor_constant<i>``; those attributes are taken back off,
    so recognizing a model leaves it as it was.
    """
    tracer = _ShapeTracer(module, shapes, call)
    before = set(vars(module))
    try:
        graph = tracer.trace(module, concrete_args=concrete or None)
    finally:
        added = set(vars(module)) - before
        constants = {name: getattr(module, name) for name in added}
        for name in added:
            delattr(module, name)
    # Plain tensor attributes of submodules (not parameters or buffers) are constants to the trace too.
    state = {name for name, _ in module.named_parameters()} | {name for name, _ in module.named_buffers()}
    for tensor, name in tracer.tensor_attrs.items():
        if name not in state and torch.is_tensor(tensor):
            constants.setdefault(name, tensor)
    return graph, constants


def recognize(module: nn.Module, has_cond: bool, ndim: Optional[int] = None, shapes=None, call=None) -> Recipe:
    """The recipe of a user-written MLP module called as module(x) or module(x, cond), x with ndim dims
    (None: unknown, so only dim=-1 is the feature dim). shapes: those of x and cond, None for the dims that
    count points, for control flow on shapes; None when they are not known. call: the call's own shapes, where
    the recipe serves that call alone."""
    try:
        params = list(inspect.signature(module.forward).parameters.values())
    except (TypeError, ValueError):
        raise NotFusable(f"{type(module).__name__}.forward has no inspectable signature") from None
    n_args = 2 if has_cond else 1
    variadic = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    named = [p for p in params if p.kind not in variadic]
    if len(named) < n_args:
        raise NotFusable(f"{type(module).__name__}.forward takes {len(named)} named arguments, torchjac calls it "
                         f"with {n_args}")
    concrete = {}
    for p in named[n_args:]:
        if p.default is inspect.Parameter.empty:
            raise NotFusable(f"{type(module).__name__}.forward needs argument {p.name!r} besides "
                             f"{'(x, cond)' if has_cond else 'x'}; give it a default, or pass "
                             f"lambda x{', cond' if has_cond else ''}: model(...) with every argument")
        concrete[p.name] = p.default
    for p in params:
        if p.kind is inspect.Parameter.VAR_POSITIONAL:  # torchjac passes nothing through *args
            concrete[p.name] = ()
    try:
        graph, constants = _trace(module, concrete, shapes, call)
        widths = {} if shapes is None else dict(zip(("x", "cond"), (shape[-1] if shape else 1 for shape in shapes)))
    except NotFusable:
        raise
    except Exception as e:  # tracing fails on data-dependent control flow and the like
        raise NotFusable(f"torch.fx could not trace {type(module).__name__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    try:
        return _interpret(module, graph, n_args, ndim, constants, cond_linears=False, widths=widths)
    except NotFusable as first:
        if not has_cond:
            raise
        # A Linear of cond alone is a layer of the MLP (x joining later), or it computes a modulation
        # (FiLM's gamma(cond)): the second reading is tried where the first does not fit.
        try:
            return _interpret(module, graph, n_args, ndim, constants, cond_linears=True, widths=widths)
        except NotFusable as second:
            if str(second) == str(first):
                raise first from None
            raise NotFusable(f"{first}; with its Linear layers of cond alone read as computing modulations: "
                             f"{second}") from None


def _interpret(module, graph, n_args, ndim, constants, cond_linears, widths=None) -> Recipe:
    interpreter = _Interpreter(module, n_args, ndim, constants, cond_linears, widths)
    result = interpreter.run(graph)
    if not interpreter.layers:
        raise NotFusable(f"{type(module).__name__} has no Linear layer")
    return interpreter.recipe(result)
