"""Recognizing user-written MLP modules with torch.fx, so they run on the fused ops.

A module is recognized when its traced forward is a chain of Linear layers and
supported activations, where a layer may read ``torch.cat`` of the previous
layer's output with the input ``x`` and the condition ``cond`` (in any order),
and values may be scaled by constants (NeuS divides its skip by sqrt(2)). The
result is a *recipe*: plain Python values naming the Linear submodules, the
column blocks each one reads, the activation after it and the constant scales.
The recipe holds no tensors; ``spec.from_recipe`` reads the parameters at call
time. Anything else raises ``NotFusable`` naming the node that stopped it.
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


class NotFusable(Exception):
    """The model is valid, but the fused MLP ops cannot express it; the message says why."""


class RecipeLayer(NamedTuple):
    module: str                           # qualified name of the nn.Linear
    blocks: Tuple[Tuple[str, float], ...]  # the input columns in order: ("x" | "cond" | "h", scale)
    z_scale: float                        # z = z_scale * (W @ input + b)
    activation: Tuple[int, float, float]  # code, p0, p1


class Recipe(NamedTuple):
    layers: Tuple[RecipeLayer, ...]


@dataclasses.dataclass
class _Layer:
    """A Linear layer being recognized; activation stays None until its use settles it."""
    module: str
    blocks: tuple
    z_scale: float = 1.0
    activation: Optional[Tuple[int, float, float]] = None


_IDENTITY = (int(act.Act.IDENTITY), 0.0, 0.0)


class _LayerOut(NamedTuple):
    index: int
    scale: float     # the value is scale * (activated or raw) output of layer `index`
    activated: bool


class _Meta(NamedTuple):
    """A shape or a slice: only allowed as the target shape of an expand."""
    node: str


_SCALAR = (int, float)
_MUL = {operator.mul, torch.mul, "mul"}
_DIV = {operator.truediv, torch.div, torch.true_divide, "div", "true_divide"}
_CAT = {torch.cat, torch.concat, "cat", "concat"}
_EXPAND = {"expand", "expand_as", "broadcast_to", torch.broadcast_to}
_SHAPE = {"size", "dim", operator.getitem, getattr}


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


class _Interpreter:
    def __init__(self, module: nn.Module):
        self.module = module
        self.layers = []        # _Layer, in call order
        self.consumed = set()   # layers whose activation is settled

    def settle(self, out: _LayerOut, node) -> Tuple[Tuple[str, float], ...]:
        """The layer output as input columns; a raw output means the layer has no activation."""
        layer = self.layers[out.index]
        if not out.activated:
            if out.index in self.consumed and layer.activation not in (None, _IDENTITY):
                raise NotFusable(f"node {node.name!r}: a layer's output is used both before and after "
                                 f"its activation")
            layer.activation = layer.activation or _IDENTITY
        self.consumed.add(out.index)
        return (("h", out.index, out.scale),)

    def blocks(self, value, node):
        if isinstance(value, _LayerOut):
            return self.settle(value, node)
        if isinstance(value, tuple) and value and isinstance(value[0], tuple):
            return value
        raise NotFusable(f"node {node.name!r} ({node.op} {_target_name(node)}): expected a feature tensor "
                         f"input, got {type(value).__name__}")

    def scale(self, value, factor, node):
        if isinstance(value, _LayerOut):
            return value._replace(scale=value.scale * factor)
        return tuple((src, i, s * factor) for src, i, s in self.blocks(value, node))

    def linear(self, name, blocks, node):
        index = len(self.layers)
        for src, i, _ in blocks:
            if src == "h" and i != index - 1:
                raise NotFusable(f"node {node.name!r}: Linear {name!r} reads the output of layer {i}, not of the "
                                 f"layer just before it; only skips of the input x and cond are fused")
        if index == 0 and any(src == "h" for src, _, _ in blocks):
            raise NotFusable(f"node {node.name!r}: the first Linear must read x and cond only")
        if index > 0 and not any(src == "h" for src, _, _ in blocks):
            raise NotFusable(f"node {node.name!r}: Linear {name!r} does not read the previous layer")
        self.layers.append(_Layer(name, blocks))
        return _LayerOut(index, 1.0, False)

    def activation(self, value, encoded, node):
        if not isinstance(value, _LayerOut) or value.activated:
            raise NotFusable(f"node {node.name!r}: an activation must directly follow a Linear layer")
        layer = self.layers[value.index]
        if value.index in self.consumed or layer.activation is not None:
            raise NotFusable(f"node {node.name!r}: a layer's output is used both before and after its activation")
        layer.z_scale *= value.scale  # a constant before the activation folds into the layer
        layer.activation = (int(encoded[0]), float(encoded[1]), float(encoded[2]))
        return _LayerOut(value.index, 1.0, True)

    def run(self, graph: torch.fx.Graph):
        env = {}
        placeholders = 0
        result = None
        for node in graph.nodes:
            def val(a):
                return env[a.name] if isinstance(a, torch.fx.Node) else a
            args = [torch.fx.node.map_arg(a, val) for a in node.args]
            kwargs = {k: torch.fx.node.map_arg(v, val) for k, v in node.kwargs.items()}
            target = node.target
            if node.op == "placeholder":
                source = ("x", "cond")[placeholders] if placeholders < 2 else None
                if source is None:
                    raise NotFusable(f"node {node.name!r}: forward takes more than (x, cond)")
                env[node.name] = ((source, 0, 1.0),)
                placeholders += 1
            elif node.op == "call_module":
                sub = self.module.get_submodule(target)
                encoded = act.encode(sub)
                # computes_as: a subclass with its own forward can be a leaf here too (a parametrized
                # module's class lives in torch.nn), and it does not compute what the base class does.
                if act.computes_as(sub, nn.Linear):
                    env[node.name] = self.linear(target, self.blocks(args[0], node), node)
                elif act.computes_as(sub, nn.Identity) or (act.computes_as(sub, nn.Dropout) and not sub.training):
                    env[node.name] = args[0]
                elif encoded is not None:
                    env[node.name] = self.activation(args[0], encoded, node)
                else:
                    raise NotFusable(f"node {node.name!r}: module {target!r} ({type(sub).__name__}) is not a "
                                     f"Linear layer or supported activation")
            elif node.op in ("call_function", "call_method"):
                key = target if node.op == "call_function" else str(target)
                encoded = _functional_activation(key, args, kwargs)
                if encoded is not None:
                    env[node.name] = self.activation(args[0], encoded, node)
                elif key in _CAT:
                    dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
                    if dim != -1:
                        raise NotFusable(f"node {node.name!r}: torch.cat along dim {dim}; the fused path needs "
                                         f"dim=-1 (the feature dim)")
                    env[node.name] = tuple(b for part in args[0] for b in self.blocks(part, node))
                elif key in _MUL | _DIV and len(args) == 2:
                    a, b = args
                    if isinstance(b, _SCALAR) and not isinstance(b, bool):
                        factor, value = (1.0 / b if key in _DIV else float(b)), a
                    elif isinstance(a, _SCALAR) and not isinstance(a, bool) and key in _MUL:
                        factor, value = float(a), b
                    else:
                        raise NotFusable(f"node {node.name!r}: {_target_name(node)} of two tensors; only scaling "
                                         f"by a Python constant is fused")
                    env[node.name] = self.scale(value, factor, node)
                elif key in _EXPAND:
                    env[node.name] = args[0]
                elif key in _SHAPE or key == "__getitem__":
                    env[node.name] = _Meta(node.name)
                else:
                    raise NotFusable(f"node {node.name!r}: {node.op} {_target_name(node)} is not part of a "
                                     f"Linear/activation chain")
            elif node.op == "output":
                result = args[0]
            elif node.op == "get_attr":
                raise NotFusable(f"node {node.name!r}: the forward reads the tensor {target!r} (a buffer or "
                                 f"constant, such as a positional encoding's frequency bands) outside any Linear "
                                 f"layer; the fused path has no input encodings yet, so the generic path computes "
                                 f"this model, exactly")
            else:
                raise NotFusable(f"node {node.name!r}: {node.op} {target!r} is not supported")
        return result

    def recipe(self, result, node_name="output"):
        if not isinstance(result, _LayerOut) or result.index != len(self.layers) - 1:
            raise NotFusable(f"{node_name}: the module must return the output of its last Linear layer "
                             f"(or its activation)")
        last = self.layers[-1]
        if last.activation is None:
            last.activation = _IDENTITY
        if result.scale != 1.0:
            if result.activated and last.activation != _IDENTITY:
                raise NotFusable(f"{node_name}: the output is scaled after a nonlinear activation")
            last.z_scale *= result.scale
        if any(layer.activation is None for layer in self.layers):
            raise NotFusable("a Linear layer's output is not used by the next layer")
        layers = tuple(RecipeLayer(layer.module, tuple((src, float(k)) for src, _, k in layer.blocks),
                                   float(layer.z_scale), layer.activation) for layer in self.layers)
        return Recipe(layers)


def _target_name(node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def recognize(module: nn.Module, has_cond: bool) -> Recipe:
    """The recipe of a user-written MLP module called as module(x) or module(x, cond)."""
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
        if p.kind in variadic:  # torchjac passes nothing through *args or **kwargs
            concrete[p.name] = () if p.kind is inspect.Parameter.VAR_POSITIONAL else {}
    try:
        graph = torch.fx.Tracer().trace(module, concrete_args=concrete or None)
    except Exception as e:  # tracing fails on data-dependent control flow and the like
        raise NotFusable(f"torch.fx could not trace {type(module).__name__}: {type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}") from None
    interpreter = _Interpreter(module)
    result = interpreter.run(graph)
    if not interpreter.layers:
        raise NotFusable(f"{type(module).__name__} has no Linear layer")
    return interpreter.recipe(result)
