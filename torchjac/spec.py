"""Lowering of a model to the ops' MLP description: weights, biases, activation codes, skips.

Three kinds of model run on the fused ops: ``PointMLP``; an ``nn.Sequential`` of
Linear layers (or, channels-first, ``Conv1d(kernel_size=1)`` layers) and
supported activations; and user-written modules, Sequential subclasses with a
forward of their own among them, that torch.fx recognizes as such a chain
(torchjac/trace.py). Everything else is computed by the generic path.

A model is lowered by what its forward does: an ``nn.Sequential`` is read as a
chain only when its class keeps ``nn.Sequential.forward``, and then in the order
that forward calls its modules, a module used twice included. A module with
hooks runs on the generic path, which calls it as the user does.

Parameters are read at every call (never cached), so parametrizations such as
weight_norm (the parametrization and the older hook), ``torch.func.functional_call``
and in-place weight updates all see the current values and gradients reach the
real parameters.
"""
import os
import sys
from typing import List, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torch.nn.utils.weight_norm import WeightNorm  # the older weight_norm's forward pre-hook

from . import activations as act
from .encoding import FrequencyEncoding
from .mlp import PointMLP
from . import cond_program
from .cond_program import ValueRef
from .trace import NotFusable, Recipe, recognize

CHANNELS_LAST = "channels_last"    # x (..., features): features in the last dim
CHANNELS_FIRST = "channels_first"  # x (B, features, N) or (features, N): PointNet's Conv1d layout

_SUPPORTED = ("nn.Linear (or nn.Conv1d with kernel_size=1, channels-first), nn.Identity, nn.Dropout (eval), "
              "nn.BatchNorm1d (eval), nested nn.Sequential and the activations ReLU, LeakyReLU, Softplus, SiLU, "
              "GELU, Tanh, Sigmoid, ELU, torchjac.Sine")


class MLPSpec(NamedTuple):
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    activations: List[int]
    activation_params: List[float]
    skip_layers: List[int]
    d_in: int           # features of x
    cond_features: int  # features of cond (0 without)
    layout: str = CHANNELS_LAST
    # An input encoding e(x): the ops then read e where they read x (torchjac/encoding.py composes them).
    encoding: Optional[FrequencyEncoding] = None

    @property
    def d_out(self) -> int:
        return self.weights[-1].shape[0]

    def op_args(self) -> Tuple:
        return self.weights, self.biases, self.activations, self.activation_params, self.skip_layers

    def select_outputs(self, rows: List[int]) -> "MLPSpec":
        """The same MLP computing only the output features `rows` (the last layer's rows)."""
        index = torch.tensor(rows, device=self.weights[-1].device)
        return self._replace(weights=self.weights[:-1] + [self.weights[-1][index]],
                             biases=self.biases[:-1] + [self.biases[-1][index]])

    def jacobian_mode(self, device: torch.device) -> str:
        """The op mode that computes J on device."""
        return "jacobian_reverse" if jacobian_direction(self.d_in, self.d_out, device) == "reverse" else "jacobian"


def has_fused_forward_kernel(device: torch.device) -> bool:
    """Whether a fused (forward-mode) kernel serves device; the reverse mode has none yet."""
    key = device.type.upper()
    return key != "CPU" and torch._C._dispatch_has_kernel_for_dispatch_key("torchjac::mlp_jacobian", key)


def jacobian_direction(d_in: int, d_out: int, device: torch.device) -> str:
    """"reverse" (d_out cotangent rows) when d_out < d_in, else "forward" (d_in tangent rows).

    Each hidden GEMM carries the value row plus those rows, and the training backward carries as many again,
    so the fewer rows are the cheaper direction for J and for its gradient alike. A device with a fused
    forward-mode kernel keeps it: the reverse mode there is the pure-PyTorch path.
    """
    return "reverse" if d_out < d_in and not has_fused_forward_kernel(device) else "forward"


def current(module: nn.Module, name: str) -> torch.Tensor:
    """The parameter ``name`` of module as its forward would use it now.

    The older ``torch.nn.utils.weight_norm`` keeps ``g`` and ``v`` as parameters and refreshes the plain
    attribute only in a forward pre-hook, so between calls that attribute is stale (after an optimizer step,
    ``load_state_dict`` or ``.double()``); it is recomputed here from ``g`` and ``v``, as the hook does.
    """
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm) and hook.name == name:
            return hook.compute_weight(module)
    return getattr(module, name)


def weight_norm_attributes(f) -> list:
    """(module, name, value) of every attribute the older weight_norm's hooks in f assign when called."""
    if not isinstance(f, nn.Module):
        return []
    return [(m, hook.name, getattr(m, hook.name)) for m in f.modules() for hook in m._forward_pre_hooks.values()
            if isinstance(hook, WeightNorm)]


def _parameter(f: nn.Module, name: str) -> torch.Tensor:
    """The parameter `name` (qualified) of f as its forward would use it now."""
    module, _, attr = name.rpartition(".")
    return current(f.get_submodule(module), attr)


def _weight(layer: nn.Module) -> torch.Tensor:
    return current(layer, "weight")


def _bias(layer: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    bias = current(layer, "bias")
    return bias if bias is not None else weight.new_zeros(weight.shape[0])


_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks")


_MODULE_CALL = (nn.Module.__call__, nn.Module._call_impl)  # as torch defines them
# As the code objects name their files (no realpath: it runs at every call, under torch.compile too).
_OWN_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch, sys.modules[__package__]))


def _replaced_library_forward(m: nn.Module) -> bool:
    """Whether m is of a torch or torchjac class (the fused path reads those by type) whose forward someone has
    replaced (nn.Linear.forward = ...)."""
    cls = type(m)
    if not cls.__module__.startswith(("torch.", "torchjac.")):
        return False
    code = getattr(cls.forward, "__code__", None)
    return code is None or not code.co_filename.startswith(_OWN_DIRS)


def call_time_reason(f: nn.Module) -> Optional[str]:
    """Why f cannot be lowered because of what runs only when a module is called, or None: hooks (the older
    weight_norm's hook is the one whose effect the fused ops reproduce), a forward set on the instance, which
    torch.fx and the Sequential reader, both reading the class, would not see, a __call__ other than
    nn.Module's, or a torch layer whose forward was replaced. The generic path calls f."""
    for name in _GLOBAL_HOOKS:
        if getattr(nn.modules.module, name, None):
            return "global module hooks are registered (torch.nn.modules.module.register_module_*_hook)"
    if (nn.Module.__call__, nn.Module._call_impl) != _MODULE_CALL:
        return "nn.Module.__call__ has been replaced, and torch.fx and the fused ops do not run it"
    for name, m in f.named_modules():
        kinds = [kind for kind, hooks in (("forward", m._forward_hooks), ("backward", m._backward_hooks),
                                          ("backward pre-", getattr(m, "_backward_pre_hooks", {})))
                 if hooks]
        if any(not isinstance(h, WeightNorm) for h in m._forward_pre_hooks.values()):
            kinds.append("forward pre-")
        if kinds:
            what = f"{' and '.join(k + 'hooks' for k in kinds)}, which run"
        elif "forward" in vars(m):
            what = "a forward set on the instance, which replaces its class's forward"
        elif type(m).__call__ is not _MODULE_CALL[0]:
            what = f"a __call__ of its own ({type(m).__qualname__}.__call__), which runs"
        elif _replaced_library_forward(m):
            what = f"a replaced {type(m).__qualname__}.forward, which the fused path, reading the layer by its type, " \
                   f"does not run; it runs"
        else:
            continue
        where = f"module {name!r} ({type(m).__name__})" if name else f"{type(m).__name__}"
        return f"{where} has {what} only when the module is called; the generic path calls it"
    return None


# ---- models that cannot be point-wise

def _spatial_dims(m: nn.Module) -> Optional[int]:
    """The spatial dims a torch.nn conv, pool or instance-norm module works on (its class's 1d/2d/3d)."""
    if isinstance(m, nn.modules.conv._ConvNd):
        return len(m.kernel_size)
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn") and cls.__name__[-2:] in ("1d", "2d", "3d"):
            return int(cls.__name__[-2])
    return None


def _point_mixing_reason(m: nn.Module, event_dims: int, ndim: Optional[int], conv1d_stack: bool = False):
    """Why module m mixes points (or is random per point), or None.

    A point is the last event_dims dims of an ndim-dim x: mixing within those is no mixing of points.
    ``conv1d_stack``: m is in an nn.Sequential of Conv1d layers, which torchjac reads channels-first.
    """
    if isinstance(m, (nn.modules.dropout._DropoutNd)) and m.training and m.p > 0:
        return "dropout in training mode is random per call; call .eval() on the model (or set p=0)"
    if ndim is not None and event_dims >= ndim:  # x is a single point
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
        return ("BatchNorm in training mode (or without running stats) normalizes over the batch, so points are "
                "not independent and the per-point Jacobian is not defined; call .eval() to use its running "
                "statistics")
    spatial = _spatial_dims(m)
    within_event = spatial is not None and event_dims >= 1 + spatial  # channels and spatial dims in one point
    if isinstance(m, nn.modules.instancenorm._InstanceNorm) and not within_event:
        return (f"it normalizes over the points (spatial dims); with event_dims={1 + spatial} a point is "
                f"(channels, *spatial) and nothing mixes across points")
    if isinstance(m, nn.GroupNorm) and not (ndim is not None and event_dims >= ndim - 1):
        return "it normalizes over the channels and spatial dims; with event_dims=x.dim()-1 each sample is a point"
    if isinstance(m, (nn.MultiheadAttention, nn.RNNBase)) and not (event_dims >= 2 and m.batch_first):
        return ("it mixes the entries of a sequence; with batch_first=True and event_dims=2 a point is a whole "
                "sequence")
    pools = (nn.modules.pooling._MaxPoolNd, nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
             nn.modules.pooling._AdaptiveAvgPoolNd)
    if isinstance(m, pools) and not within_event:
        return f"it pools over points; with event_dims={1 + spatial} a point is (channels, *spatial)"
    if isinstance(m, nn.modules.conv._ConvNd) and not within_event:
        # With kernel 1, padding "same" and "valid" are both no padding.
        no_padding = isinstance(m.padding, str) or all(p == 0 for p in m.padding)
        pointwise = all(k == 1 for k in m.kernel_size) and all(s == 1 for s in m.stride) and no_padding
        if not pointwise:
            return (f"a convolution with kernel_size, stride or padding other than 1, 1, 0 mixes neighbouring "
                    f"points; with event_dims={1 + spatial} a point is (channels, *spatial)")
        if not conv1d_stack:
            return ("a convolution mixes dim 1 (channels), but outside an nn.Sequential of Conv1d layers torchjac "
                    "takes the features from the last dim; put the Conv1d(kernel_size=1) layers in an "
                    "nn.Sequential, or, if the forward moves the features to dim 1 and back itself, pass "
                    "`lambda x: model(x)` as f")
    return None


def refuse_point_mixing(fn: str, f, event_dims: int = 1, ndim: Optional[int] = None):
    """Raise for a module known to couple points: its per-point Jacobian would be wrong, not just slow."""
    if not isinstance(f, nn.Module):
        return
    conv1d_stack = isinstance(f, nn.Sequential) and sequential_layout(f) == CHANNELS_FIRST
    for name, m in f.named_modules():
        reason = _point_mixing_reason(m, event_dims, ndim, conv1d_stack)
        if reason is not None:
            where = f"module {name!r} ({type(m).__name__})" if name else f"f ({type(m).__name__})"
            raise ValueError(f"torchjac.{fn}: {where}: {reason}")


# ---- PointMLP

def _from_point_mlp(f: PointMLP) -> MLPSpec:
    code, p0, p1 = act.encode(f.activation)
    n = len(f.layers)
    weights = [_weight(layer) for layer in f.layers]
    return MLPSpec(
        weights, [_bias(layer, w) for layer, w in zip(f.layers, weights)],
        [int(code)] * (n - 1) + [int(act.Act.IDENTITY)], [p0, p1] * (n - 1) + [0.0, 0.0],
        list(f.skip_layers), f.in_features, f.cond_features)


# ---- nn.Sequential

def is_plain_sequential(m) -> bool:
    """An nn.Sequential (or subclass) whose forward is nn.Sequential's: it calls its modules in turn,
    in the order of its own iteration."""
    return act.computes_as(m, nn.Sequential) and type(m).__iter__ is nn.Sequential.__iter__


def _chain(seq: nn.Sequential, prefix: str = ""):
    """(name, module) in the order seq's forward calls them, a module registered twice included
    (``named_children`` would yield it once). Nested plain Sequentials are opened."""
    for name, m in seq._modules.items():
        if is_plain_sequential(m):
            yield from _chain(m, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", m


_CHAIN_LAYERS = (nn.Linear, nn.Conv1d, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                 nn.BatchNorm1d)


def _chain_layer_kind(m: nn.Module) -> bool:
    """A layer the Sequential lowering reads; a subclass with a forward of its own is not one."""
    return any(act.computes_as(m, base) for base in _CHAIN_LAYERS) or act.encode(m) is not None


def _unsupported_in_chain(f: nn.Sequential) -> Optional[str]:
    """Why f is not a chain the Sequential lowering reads, or None."""
    if not is_plain_sequential(f):
        return f"{type(f).__name__} is an nn.Sequential subclass with its own forward"
    for name, m in _chain(f):
        if not _chain_layer_kind(m):
            what = ("an nn.Sequential subclass with its own forward" if isinstance(m, nn.Sequential)
                    else "not supported by the fused MLP path")
            return f"nn.Sequential layer {name!r} ({type(m).__name__}) is {what}; supported: {_SUPPORTED}"
    return None


def sequential_layout(f: nn.Sequential) -> str:
    # Any Conv1d, even inside a block, means channels-first x (B, C, N).
    convs = any(isinstance(m, nn.Conv1d) for m in f.modules())
    return CHANNELS_FIRST if convs else CHANNELS_LAST


def is_point_mlp(f) -> bool:
    """A PointMLP that computes what PointMLP does (not a subclass with a forward of its own)."""
    return act.computes_as(f, PointMLP)


def _conv1d_weight(m: nn.Conv1d) -> torch.Tensor:
    """A 1x1 Conv1d as a Linear weight (out, in); groups give a block-diagonal matrix."""
    w = _weight(m)[:, :, 0]
    if m.groups == 1:
        return w
    return torch.block_diag(*w.chunk(m.groups, 0))


def _from_sequential(f: nn.Sequential, n_inputs: int, cond_features: int, x: torch.Tensor) -> MLPSpec:
    """Linear layers each followed by one activation; an activation with no Linear of its own
    (at the start, or a second one in a row) gets an identity Linear, which is exact."""
    layout = sequential_layout(f)
    weights, biases, codes, params = [], [], [], []
    width = n_inputs
    # Identity layers take the parameters' dtype and device, or x's for a model with none.
    like = next(f.parameters(), x)

    def add_layer(w, b):
        weights.append(w)
        biases.append(b)
        codes.append(int(act.Act.IDENTITY))
        params.extend([0.0, 0.0])

    def identity_layer():
        add_layer(torch.eye(width, dtype=like.dtype, device=like.device),
                  torch.zeros(width, dtype=like.dtype, device=like.device))

    for name, m in _chain(f):
        where = f"nn.Sequential layer {name!r} ({type(m).__name__})"
        if isinstance(m, (nn.Linear, nn.Conv1d)):
            if isinstance(m, nn.Linear) and layout == CHANNELS_FIRST:
                raise ValueError(f"{where}: in a channels-first stack of Conv1d layers, nn.Linear acts on the "
                                 f"points dim; use nn.Conv1d(kernel_size=1)")
            n_in = m.in_features if isinstance(m, nn.Linear) else m.in_channels
            if n_in != width:
                raise ValueError(f"{where}: expected {width} input features (the width reaching it), got {n_in}")
            w = _weight(m) if isinstance(m, nn.Linear) else _conv1d_weight(m)
            add_layer(w, _bias(m, w))
            width = w.shape[0]
        elif isinstance(m, (nn.Identity, nn.modules.dropout._DropoutNd)):
            continue  # dropout in training mode was refused by refuse_point_mixing
        elif isinstance(m, nn.BatchNorm1d):
            # BatchNorm1d normalizes dim 1: the features for (P, C) and (B, C, N) input.
            if x.dim() != (3 if layout == CHANNELS_FIRST else 2):
                expected = "(B, C, N)" if layout == CHANNELS_FIRST else "(P, features)"
                raise ValueError(f"{where}: BatchNorm1d normalizes dim 1, which holds points, not features, for x "
                                 f"of shape {tuple(x.shape)}; it acts per feature only on x of shape {expected}")
            if m.num_features != width:
                raise ValueError(f"{where}: expected num_features={width}, got {m.num_features}")
            # Eval BatchNorm is the per-feature affine map scale * h + shift.
            scale = torch.rsqrt(m.running_var + m.eps)
            shift = -m.running_mean * scale
            if m.affine:
                scale, shift = scale * m.weight, shift * m.weight + m.bias
            add_layer(torch.diag(scale), shift)
        else:
            encoded = act.encode(m)
            if encoded is None:
                raise NotFusable(f"{where} is not supported by the fused MLP path; supported: {_SUPPORTED}")
            if not codes or codes[-1] != act.Act.IDENTITY:
                identity_layer()
            codes[-1] = int(encoded[0])
            params[-2:] = [encoded[1], encoded[2]]
    if not weights:
        identity_layer()
    return MLPSpec(weights, biases, codes, params, [], n_inputs - cond_features, cond_features, layout)


# ---- user-written modules, through their torch.fx recipe

class Recognition(NamedTuple):
    recipe: Optional[Recipe]  # None when f is not recognized
    reason: str               # why not


@torch.compiler.assume_constant_result
def _recognize(f: nn.Module, has_cond: bool, ndim: Optional[int] = None, shapes=None, call=None) -> Recognition:
    # Evaluated once while torch.compile traces: the result is plain Python values. It returns, never
    # raises, the reason a model is not recognized: torch.compile cannot trace an exception out of here.
    try:
        return Recognition(recognize(f, has_cond, ndim, shapes, call), "")
    except NotFusable as e:
        return Recognition(None, str(e))


def call_shapes(x: torch.Tensor, cond: Optional[torch.Tensor], cond_features: int) -> tuple:
    """(shapes, call): the shapes of x and cond that recognition may specialize on (trace.recognize), their
    feature widths and dims with None for each dim that counts points, a cond shared by all points as it is;
    and the call's own shapes, or None under torch.compile, where one recipe serves every number of points."""
    def points(t, features):
        return (None,) * (t.dim() - 1) + (int(features),)

    tensors = (x,) if cond is None else (x, cond)
    call = None if torch.compiler.is_compiling() else tuple(tuple(t.shape) for t in tensors)
    if cond is None:
        return (points(x, x.shape[-1]),), call
    shared = cond.numel() == cond_features
    return (points(x, x.shape[-1]), tuple(int(n) for n in cond.shape) if shared else points(cond, cond_features)), call


def _recipe(f: nn.Module, has_cond: bool, ndim: int, shapes=None, call=None) -> Recipe:
    recognition = _recognize(f, has_cond, ndim, shapes, call)
    if recognition.recipe is None:
        raise NotFusable(recognition.reason)
    return recognition.recipe


def _column_blocks(weight: torch.Tensor, blocks, widths) -> dict:
    """The weight's columns per source ("h", "x", "cond"), scaled, summed over repeats."""
    out, start = {}, 0
    for source, scale in blocks:
        n = widths[source]
        part = weight[:, start:start + n] * scale
        out[source] = out[source] + part if source in out else part
        start += n
    if start != weight.shape[1]:
        raise ValueError(f"expected {start} input features from the traced concatenation, got {weight.shape[1]}")
    return out


def _modulated(w, b, modulation, values):
    """W and b of a layer whose output W h + b is then multiplied or shifted, step by step, by constants or by
    vectors computed from cond (one per output feature, or one for all)."""
    for op, operand in modulation:
        g = values[operand.index] if isinstance(operand, ValueRef) else operand
        if torch.is_tensor(g):
            if g.numel() not in (1, w.shape[0]):
                raise NotFusable(f"a layer of {w.shape[0]} outputs is modulated by a tensor of shape "
                                 f"{tuple(g.shape)} computed from cond; the fused path folds one value per output "
                                 f"feature")
            g = g.reshape(-1)
        if op == "mul":
            w, b = (g[:, None] if torch.is_tensor(g) else g) * w, g * b
        else:
            b = b + g
    return w, b


def from_recipe(f: nn.Module, recipe: Recipe, d_in: int, cond_features: int,
                cond: Optional[torch.Tensor] = None) -> MLPSpec:
    """The layers of a recipe. Those reading the input take cat([x, enc_0(x), ..., cond]) when the recipe
    encodes x, zero columns standing for blocks a layer does not read. cond: the call's, as the user passed it,
    on which the recipe's cond program runs."""
    values = []
    if recipe.cond_program:
        try:
            values = cond_program.replay(f, recipe.cond_program, cond, _parameter)
        except RuntimeError as e:
            if torch.compiler.is_compiling():
                raise
            # the recipe's reading of the cond computation does not fit this call's shapes: the generic path
            # runs the forward as written
            raise NotFusable(f"what the forward computes from cond does not replay on this call ({e})") from None
    weights, biases, codes, params, skips = [], [], [], [], []
    encoded = [f"enc{j}" for j in range(len(recipe.encoding))]
    inputs = [("x", d_in)] + [(source, d_in) for source in encoded] + [("cond", cond_features)]
    width_h = 0
    for i, layer in enumerate(recipe.layers):
        if layer.parameters is not None:  # parameters the forward reads itself (F.linear, BatchLinear)
            w = _parameter(f, layer.parameters[0])
            b = w.new_zeros(w.shape[0]) if layer.parameters[1] is None else _parameter(f, layer.parameters[1])
        elif layer.terms:  # Linear layers of one input, mixed: sum_k c_k (W_k h + b_k)
            w = b = 0.0
            for name, c in zip((layer.module, *layer.terms), layer.term_coefs):
                c = values[c.index] if isinstance(c, ValueRef) else c
                if torch.is_tensor(c):
                    if c.numel() != 1:
                        raise NotFusable(f"layer {i}: Linear layers of one input are mixed by a tensor of shape "
                                         f"{tuple(c.shape)} computed from cond; the fused path mixes them by one "
                                         f"number")
                    c = c.reshape(())
                linear = f.get_submodule(name)
                w_k = _weight(linear)
                w, b = w + c * w_k, b + c * _bias(linear, w_k)
        elif layer.weight_value is None:
            linear = f.get_submodule(layer.module)
            w = _weight(linear)
            b = _bias(linear, w)
        else:  # F.linear with a weight and bias computed from cond
            w = values[layer.weight_value[0]]
            b = w.new_zeros(w.shape[0]) if layer.weight_value[1] is None else values[layer.weight_value[1]]
            if w.dim() != 2 or b.shape != (w.shape[0],):
                raise NotFusable(f"layer {i}: F.linear with a weight of shape {tuple(w.shape)} and a bias of shape "
                                 f"{tuple(b.shape)} computed from cond")
        w, b = _modulated(w, b, layer.modulation, values)
        widths = {"h": width_h, **dict(inputs)}
        try:
            cols = _column_blocks(w, layer.blocks, widths)
        except ValueError as e:  # the trace read the widths otherwise than the model (a broadcast): not fused
            raise NotFusable(f"Linear {layer.module!r}: {e}") from None
        reads_input = any(source != "h" for source in cols)
        if i > 0 and reads_input:
            skips.append(i)
        parts = [cols["h"]] if i > 0 else []
        if i == 0 or reads_input:
            for source, n in inputs:
                parts.append(cols[source] if source in cols else w.new_zeros(w.shape[0], n))
        w_ours = torch.cat(parts, 1) if len(parts) > 1 else parts[0]
        if layer.z_scale != 1.0:
            w_ours, b = w_ours * layer.z_scale, b * layer.z_scale
        weights.append(w_ours)
        biases.append(b)
        codes.append(layer.activation[0])
        params.extend(layer.activation[1:])
        width_h = w.shape[0]
    if recipe.output_rows is not None:  # the module returns some of the last layer's features, scaled
        rows = torch.tensor([r for r, _ in recipe.output_rows], device=weights[-1].device)
        scales = weights[-1].new_tensor([s for _, s in recipe.output_rows])
        weights[-1] = weights[-1][rows] * scales[:, None]
        biases[-1] = biases[-1][rows] * scales
    encoding = FrequencyEncoding((("x", 1.0),) + recipe.encoding) if recipe.encoding else None
    return MLPSpec(weights, biases, codes, params, skips, d_in, cond_features, encoding=encoding)


# ---- entry points

def lower(f, x: torch.Tensor, cond_features: int, cond: Optional[torch.Tensor] = None) -> MLPSpec:
    """The MLP description of f for channels-last x (..., d_in), or NotFusable if only the generic
    path can compute f. cond: the call's cond as the user passed it (a model may compute its weights from it)."""
    if not isinstance(f, nn.Module):
        raise NotFusable(f"f is a {type(f).__name__}, not an nn.Module")
    reason = call_time_reason(f)
    if reason is not None:
        raise NotFusable(reason)
    d_in = x.shape[-1]
    if is_point_mlp(f):
        return _from_point_mlp(f)
    if isinstance(f, nn.Sequential):
        unsupported = _unsupported_in_chain(f)
        if unsupported is None:
            return _from_sequential(f, d_in + cond_features, cond_features, x)
        if sequential_layout(f) == CHANNELS_FIRST:
            raise NotFusable(unsupported)
        # Any other Sequential is called on cat([x, cond]) too: a recipe of one input, whose columns
        # are those of x and then cond.
        joined = x.shape[:-1] + (d_in + cond_features,)  # the cat([x, cond]) the Sequential is called on
        call = None if torch.compiler.is_compiling() else (tuple(joined),)
        spec = from_recipe(f, _recipe(f, False, x.dim(), ((None,) * (x.dim() - 1) + (d_in + cond_features,),), call),
                           d_in + cond_features, 0)
        if spec.encoding is not None and cond_features:  # it would encode cond too
            raise NotFusable(f"{type(f).__name__} encodes its input, which torchjac makes cat([x, cond]); pass "
                             f"`lambda x, cond: model(torch.cat([x, cond], -1))` to the generic path, or a "
                             f"module that takes (x, cond)")
        return spec._replace(d_in=d_in, cond_features=cond_features)
    recipe = _recipe(f, cond_features > 0, x.dim(), *call_shapes(x, cond if cond_features else None, cond_features))
    if recipe.cond_program and cond.numel() != cond_features:
        raise NotFusable(f"{type(f).__name__} computes layer weights or modulations from cond, which differs "
                         f"between points here (cond of shape {tuple(cond.shape)}); the fused path folds them into "
                         f"the weights only for one cond shared by all points")
    return from_recipe(f, recipe, d_in, cond_features, cond)


def _recipe_detail(f: nn.Module, recipe: Recipe) -> str:
    skips = [i for i, layer in enumerate(recipe.layers) if i and any(s != "h" for s, _ in layer.blocks)]
    encoding = (f"a frequency encoding of x ({len(recipe.encoding)} sin/cos blocks), " if recipe.encoding else "")
    rows = (f", output features {[r for r, _ in recipe.output_rows]} of the last"
            if recipe.output_rows is not None else "")
    modulated = [i for i, layer in enumerate(recipe.layers) if layer.modulation and any(
        isinstance(operand, ValueRef) for _, operand in layer.modulation)]
    from_cond = [i for i, layer in enumerate(recipe.layers) if layer.weight_value is not None]
    mixed = [i for i, layer in enumerate(recipe.layers) if layer.terms]
    notes = rows
    if modulated:
        notes += f", layers {modulated} modulated by cond"
    if from_cond:
        notes += f", the weights of layers {from_cond} computed from cond"
    if mixed:
        notes += f", layers {mixed} mixing Linear layers of one input"
    if recipe.cond_program:
        notes += " (fused for one cond shared by all points)"
    name = getattr(f, "model_name", type(f).__name__)
    return (f"{name} traced by torch.fx: {encoding}{len(recipe.layers)} Linear layers"
            + (f", skips into layers {skips}" if skips else "") + notes)


def _direction_note(d_in: Optional[int], d_out: int, encoded: bool = False) -> str:
    """Which direction the fused jacobian (and second order) takes; d_in is None when cond's width hides it."""
    cpu = torch.device("cpu")
    fused_cuda = has_fused_forward_kernel(torch.device("cuda"))
    where = "; jacobian on the CPU" if fused_cuda else "; jacobian"
    cuda = ", on CUDA in forward mode (the fused kernel)" if fused_cuda else ""
    second = ("; laplacian and hessian on the generic path (no fused second order through an input encoding yet)"
              if encoded else "; laplacian and hessian in forward mode, with second-order rows")
    if d_in is None or d_out is None:
        outputs = "d_out" if d_out is None else f"d_out={d_out}"
        return (f"{where} in forward mode, or in reverse mode if {outputs} < d_in (x's features, cond's not "
                f"counted){cuda}{second}")
    return f"{where} in {jacobian_direction(d_in, d_out, cpu)} mode (d_in={d_in}, d_out={d_out}){cuda}{second}"


def _layer_features(f: nn.Module, layer) -> Optional[Tuple[int, int]]:
    """(in, out) features of a recipe layer; None for weights computed from cond (known only at the call)."""
    if layer.parameters is not None:
        out_features, in_features = _parameter(f, layer.parameters[0]).shape
        return in_features, out_features
    if layer.weight_value is not None:
        return None
    linear = f.get_submodule(layer.module)
    return linear.in_features, linear.out_features


def _recipe_dims(f: nn.Module, recipe: Recipe, has_cond: bool) -> Tuple[Optional[int], Optional[int]]:
    """(d_in, d_out) of a recognized module; None where they are not known before the call: d_in where cond's
    width is part of the first layer's, either where a layer's weights are computed from cond."""
    first, last = (_layer_features(f, layer) for layer in (recipe.layers[0], recipe.layers[-1]))
    d_out = (len(recipe.output_rows) if recipe.output_rows is not None else
             last[1] if last is not None else None)
    if has_cond or first is None or "cond" in [block for block, _ in recipe.layers[0].blocks]:
        return None, d_out
    return first[0] // len(recipe.layers[0].blocks), d_out  # each block (x, enc<j>) is d_in wide


def explain(f, has_cond: bool = False, ndim: int = 2, shapes=None, call=None) -> Tuple[str, str]:
    """(path, detail) for f: which path computes it, why not the fused one, and the fused jacobian's direction.
    ndim: x.dim() of the call, which positive dims in the forward refer to; shapes: call_shapes of the call,
    if known."""
    if not isinstance(f, nn.Module):
        return "generic", f"f is a {type(f).__name__}, not an nn.Module; computed by batched JVPs/VJPs"
    try:
        refuse_point_mixing("explain", f)
    except ValueError as e:
        return "refused", str(e).replace("torchjac.explain: ", "")
    reason = call_time_reason(f)
    if reason is not None:
        return "generic", reason
    if is_point_mlp(f):
        return "fused", "torchjac.PointMLP" + _direction_note(f.in_features, f.out_features)
    if isinstance(f, nn.Sequential):
        unsupported = _unsupported_in_chain(f)
        channels_first = sequential_layout(f) == CHANNELS_FIRST
        if unsupported is None:
            linear = [m for _, m in _chain(f) if isinstance(m, (nn.Linear, nn.Conv1d))]
            d_in = linear and getattr(linear[0], "in_features", None) or linear and linear[0].in_channels
            d_out = linear and getattr(linear[-1], "out_features", None) or linear and linear[-1].out_channels
            note = _direction_note(None if has_cond else d_in, d_out) if linear else ""
            return "fused", ("nn.Sequential of Conv1d(kernel_size=1), channels-first (B, C, N)"
                             if channels_first else "nn.Sequential") + note
        if channels_first:  # the generic path needs features in the last dim
            return "refused", unsupported + "; a channels-first Conv1d stack has no generic fallback"
        def joined(inputs):  # the one input cat([x, cond]) of a Sequential
            return None if inputs is None else (inputs[0][:-1] + (sum(s[-1] if s else 1 for s in inputs),),)

        recognition = _recognize(f, False, ndim, joined(shapes), joined(call))
        if recognition.recipe is None:
            # torch.fx only adds news when it traced into something written by the user
            user_written = not is_plain_sequential(f) or any(
                not type(m).__module__.startswith("torch.") and not _chain_layer_kind(m) for _, m in _chain(f))
            return "generic", f"{unsupported}, and {recognition.reason}" if user_written else unsupported
        return "fused", _recipe_detail(f, recognition.recipe) + _direction_note(
            *_recipe_dims(f, recognition.recipe, has_cond), bool(recognition.recipe.encoding))
    recognition = _recognize(f, has_cond, ndim, shapes, call)
    if recognition.recipe is None:
        return "generic", recognition.reason
    d_in, d_out = _recipe_dims(f, recognition.recipe, has_cond)
    if shapes is not None:  # the example's x tells d_in where cond's width hides it
        d_in = shapes[0][-1]
    return "fused", _recipe_detail(f, recognition.recipe) + _direction_note(d_in, d_out,
                                                                            bool(recognition.recipe.encoding))
