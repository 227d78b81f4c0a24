"""PointMLP: the point-wise MLP module torchjac computes Jacobians of."""
from typing import Sequence, Union

import torch
from torch import nn

from . import activations as act


def broadcast_cat(x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """cat([x, cond], -1) after broadcasting their leading dims, e.g. a (B, 1, c) latent against (B, N, 3) points."""
    lead = torch.broadcast_shapes(x.shape[:-1], cond.shape[:-1])
    return torch.cat([x.expand(*lead, x.shape[-1]), cond.expand(*lead, cond.shape[-1])], -1)


class PointMLP(nn.Module):
    """An MLP applied independently to every point: ``(..., in_features) -> (..., out_features)``.

    Args:
        in_features: d_in, the features of one point.
        hidden_features: widths of the hidden layers, e.g. ``[128] * 4``.
        out_features: d_out.
        activation: a name ("softplus", "relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "tanh",
            "sigmoid", "elu", "sine", "identity") or an activation module such as ``nn.Softplus(beta=100)``.
            It follows every hidden layer; the output layer is linear.
        cond_features: c, the size of a per-point condition (latent code, time) read by ``forward(x, cond)``.
        skip_layers: indices ``i`` of Linear layers whose input is ``cat([h, x, cond])`` (DeepSDF/NeRF style).
        bias: whether the Linear layers have biases.

    The Linear layers are in ``.layers`` (an ``nn.ModuleList``), so parametrizations such as
    ``torch.nn.utils.parametrizations.weight_norm`` can be applied to them.
    """

    def __init__(self, in_features: int, hidden_features: Sequence[int], out_features: int, *,
                 activation: Union[str, nn.Module] = "softplus", cond_features: int = 0,
                 skip_layers: Sequence[int] = (), bias: bool = True):
        super().__init__()
        hidden = list(hidden_features) if not isinstance(hidden_features, int) else [hidden_features]
        for name, value in (("in_features", in_features), ("out_features", out_features)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"PointMLP: {name} expected a positive int, got {value!r}")
        if not all(isinstance(w, int) and w >= 1 for w in hidden):
            raise ValueError(f"PointMLP: hidden_features expected a list of positive ints, got {hidden_features!r}")
        if not isinstance(cond_features, int) or cond_features < 0:
            raise ValueError(f"PointMLP: cond_features expected an int >= 0, got {cond_features!r}")
        n_layers = len(hidden) + 1
        skips = tuple(sorted(set(int(s) for s in skip_layers)))
        if any(not 0 < s < n_layers for s in skips):
            raise ValueError(f"PointMLP: skip_layers expected indices in [1, {n_layers - 1}] "
                             f"(Linear layers after the first), got {tuple(skip_layers)}")
        if isinstance(activation, str):
            try:
                activation = act.module_from_name(activation)
            except ValueError as e:
                raise ValueError(f"PointMLP: {e}") from None
        if not isinstance(activation, nn.Module) or act.encode(activation) is None:
            raise ValueError(f"PointMLP: activation expected a name or one of "
                             f"{[m.__name__ for m in act.SUPPORTED_MODULES]}, got {activation!r}")
        self.in_features, self.out_features, self.cond_features = in_features, out_features, cond_features
        self.skip_layers = skips
        self.activation = activation
        n_input = in_features + cond_features
        widths = [n_input] + hidden + [out_features]
        self.layers = nn.ModuleList(
            nn.Linear(widths[i] + (n_input if i in skips else 0), widths[i + 1], bias=bias) for i in range(n_layers))

    def network_input(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"PointMLP: x expected last dim {self.in_features}, got shape {tuple(x.shape)}")
        if self.cond_features == 0:
            if cond is not None:
                raise ValueError("PointMLP: cond given, but the module was built with cond_features=0")
            return x
        if cond is None:
            raise ValueError(f"PointMLP: cond of shape (..., {self.cond_features}) is required "
                             f"(cond_features={self.cond_features})")
        if cond.shape[-1] != self.cond_features:
            raise ValueError(f"PointMLP: cond expected last dim {self.cond_features}, got shape {tuple(cond.shape)}")
        return broadcast_cat(x, cond)

    def forward(self, x: torch.Tensor, cond=None) -> torch.Tensor:
        inp = self.network_input(x, cond)
        h = inp
        for i, layer in enumerate(self.layers):
            if i in self.skip_layers:
                h = torch.cat([h, inp], -1)
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.activation(h)
        return h
