"""Lowering of a model to the ops' MLP description: weights, biases, activation codes, skips.

Parameters are read at every call (never cached), so parametrizations such as
weight_norm, ``torch.func.functional_call`` and in-place weight updates all
see the current values and gradients reach the real parameters.
"""
from typing import List, NamedTuple, Tuple

import torch
from torch import nn

from . import activations as act
from .mlp import PointMLP

_SUPPORTED = ("nn.Linear, nn.Identity, nn.Dropout (eval), nn.BatchNorm1d (eval), nested nn.Sequential and the "
              "activations ReLU, LeakyReLU, Softplus, SiLU, GELU, Tanh, Sigmoid, ELU, torchjac.Sine")


class MLPSpec(NamedTuple):
    weights: List[torch.Tensor]
    biases: List[torch.Tensor]
    activations: List[int]
    activation_params: List[float]
    skip_layers: List[int]
    d_in: int           # features of x
    cond_features: int  # features of cond (0 without)

    @property
    def d_out(self) -> int:
        return self.weights[-1].shape[0]

    def op_args(self) -> Tuple:
        return self.weights, self.biases, self.activations, self.activation_params, self.skip_layers


def _bias(linear: nn.Linear, weight: torch.Tensor) -> torch.Tensor:
    return linear.bias if linear.bias is not None else weight.new_zeros(weight.shape[0])


def _from_point_mlp(f: PointMLP) -> MLPSpec:
    code, p0, p1 = act.encode(f.activation)
    n = len(f.layers)
    weights = [layer.weight for layer in f.layers]
    return MLPSpec(
        weights, [_bias(layer, w) for layer, w in zip(f.layers, weights)],
        [int(code)] * (n - 1) + [int(act.Act.IDENTITY)], [p0, p1] * (n - 1) + [0.0, 0.0],
        list(f.skip_layers), f.in_features, f.cond_features)


def _flatten(seq: nn.Sequential, prefix: str = ""):
    for name, m in seq.named_children():
        if isinstance(m, nn.Sequential):
            yield from _flatten(m, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", m


def _from_sequential(f: nn.Sequential, n_inputs: int, cond_features: int, x: torch.Tensor) -> MLPSpec:
    """Linear layers each followed by one activation; an activation with no Linear of its own
    (at the start, or a second one in a row) gets an identity Linear, which is exact."""
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

    for name, m in _flatten(f):
        where = f"nn.Sequential layer {name!r} ({type(m).__name__})"
        if isinstance(m, nn.Linear):
            if m.in_features != width:
                raise ValueError(f"{where}: expected in_features={width} (the width reaching it), "
                                 f"got {m.in_features}")
            w = m.weight
            add_layer(w, _bias(m, w))
            width = m.out_features
        elif isinstance(m, nn.Identity):
            continue
        elif isinstance(m, nn.Dropout):
            if m.training and m.p > 0:
                raise ValueError(f"{where}: dropout in training mode is random per call; call .eval() on the "
                                 f"model (or set p=0) before taking Jacobians")
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            if m.training or not m.track_running_stats:
                raise ValueError(f"{where}: BatchNorm in training mode (or without running stats) normalizes "
                                 f"over the batch, so points are not independent and the per-point Jacobian is "
                                 f"not defined; call .eval() to use its running statistics")
            if x.dim() != 2:
                raise ValueError(f"{where}: BatchNorm1d normalizes dim 1, which holds points, not features, for x of "
                                 f"shape {tuple(x.shape)}; it acts per feature only on x of shape (P, features)")
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
                raise ValueError(f"{where} is not supported by the fused MLP path; supported: {_SUPPORTED}")
            if not codes or codes[-1] != act.Act.IDENTITY:
                identity_layer()
            codes[-1] = int(encoded[0])
            params[-2:] = [encoded[1], encoded[2]]
    if not weights:
        identity_layer()
    return MLPSpec(weights, biases, codes, params, [], n_inputs - cond_features, cond_features)


def lower(f, n_inputs: int, cond_features: int, x: torch.Tensor) -> MLPSpec:
    """The MLP description of f for input x. ``n_inputs`` is the width of f's input, ``d_in + c``."""
    if isinstance(f, PointMLP):
        return _from_point_mlp(f)
    if isinstance(f, nn.Sequential):
        return _from_sequential(f, n_inputs, cond_features, x)
    raise TypeError(f"f: expected a torchjac.PointMLP or an nn.Sequential of {_SUPPORTED}; got "
                    f"{type(f).__name__}")
