"""The public functions: jacobian, divergence and jvp of a point-wise model."""
from typing import NamedTuple, Optional

import torch

from . import spec as spec_lib
from .mlp import PointMLP

_ESTIMATORS = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")


class _Call(NamedTuple):
    x: torch.Tensor      # (*lead, d_in), expanded to the broadcast leading shape
    cond: torch.Tensor   # (*lead_c, c) with the same ndim as x, c may be 0
    spec: spec_lib.MLPSpec

    def args(self):
        return (self.x, self.cond, *self.spec.op_args())


def _check_tensor(fn: str, name: str, t, like: Optional[torch.Tensor] = None):
    if not torch.is_tensor(t):
        raise TypeError(f"torchjac.{fn}: {name} expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"torchjac.{fn}: {name} expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < 1:
        raise ValueError(f"torchjac.{fn}: {name} expected shape (..., features), got a 0-dim tensor")
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"torchjac.{fn}: {name} expected dtype {like.dtype} on {like.device} like x, "
                         f"got dtype {t.dtype} on {t.device}")


def _prepare(fn: str, f, x, cond) -> _Call:
    _check_tensor(fn, "x", x)
    if cond is not None:
        _check_tensor(fn, "cond", cond, like=x)
    c = 0 if cond is None else cond.shape[-1]
    if isinstance(f, PointMLP) and f.cond_features != c:
        if cond is None:
            raise ValueError(f"torchjac.{fn}: f is a PointMLP with cond_features={f.cond_features}; "
                             f"pass cond of shape (..., {f.cond_features})")
        raise ValueError(f"torchjac.{fn}: cond expected last dim {f.cond_features} (f.cond_features), "
                         f"got shape {tuple(cond.shape)}")
    spec = spec_lib.lower(f, x.shape[-1] + c, c, x)
    w0 = spec.weights[0]
    if x.shape[-1] != spec.d_in:
        raise ValueError(f"torchjac.{fn}: x expected last dim {spec.d_in} (f's input features"
                         f"{f' minus cond_features={c}' if c else ''}), got shape {tuple(x.shape)}")
    if w0.shape[1] != x.shape[-1] + c:
        raise ValueError(f"torchjac.{fn}: f's first Linear layer expects {w0.shape[1]} input features, but x has "
                         f"{x.shape[-1]} and cond has {c}; with cond, an nn.Sequential receives cat([x, cond], -1)")
    if w0.dtype != x.dtype or w0.device != x.device:
        raise ValueError(f"torchjac.{fn}: x has dtype {x.dtype} on {x.device}, but f's parameters have dtype "
                         f"{w0.dtype} on {w0.device}; move one to match the other")
    if cond is None:
        lead = x.shape[:-1]
        cond = x.new_zeros((1,) * len(lead) + (0,))
    else:
        try:
            lead = torch.broadcast_shapes(x.shape[:-1], cond.shape[:-1])
        except RuntimeError:
            raise ValueError(f"torchjac.{fn}: cond's leading dims {tuple(cond.shape[:-1])} do not broadcast "
                             f"against x's {tuple(x.shape[:-1])}") from None
        cond = cond.reshape((1,) * (len(lead) + 1 - cond.dim()) + tuple(cond.shape))
    if tuple(x.shape[:-1]) != tuple(lead):
        x = x.expand(*lead, x.shape[-1])
    return _Call(x, cond, spec)


def jacobian(f, x: torch.Tensor, *, cond: Optional[torch.Tensor] = None, return_output: bool = False):
    """Per-point Jacobian ``J[..., i, j] = d f(x)_i / d x_j`` of shape ``(..., d_out, d_in)``.

    f is a ``torchjac.PointMLP`` (called as ``f(x, cond)``) or an ``nn.Sequential`` of Linear layers and
    supported activations (called on ``cat([x, cond], -1)``). ``cond`` has shape ``(..., c)`` and broadcasts
    against ``x.shape[:-1]``; it is not differentiated in J but receives gradients when training.
    With ``return_output=True`` returns ``(f(x), J)`` from the same pass.
    """
    call = _prepare("jacobian", f, x, cond)
    y, jac = torch.ops.torchjac.mlp_jacobian(*call.args())
    return (y, jac) if return_output else jac


def _noise(shape, x: torch.Tensor, kind: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    if kind == "rademacher":
        e = torch.randint(0, 2, shape, generator=generator, device=device, dtype=x.dtype) * 2 - 1
    else:
        e = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    return e.to(x.device)


def divergence(f, x: torch.Tensor, *, cond: Optional[torch.Tensor] = None, estimator: str = "exact",
               num_samples: int = 1, noise: str = "rademacher", generator: Optional[torch.Generator] = None,
               return_output: bool = False):
    """Per-point divergence (trace of the Jacobian), shape ``x.shape[:-1]``. Needs ``d_out == d_in``.

    ``estimator="hutchinson"`` returns the unbiased estimate ``mean_s e_s^T J e_s`` over ``num_samples``
    noise vectors per point, drawn as ``noise`` ("rademacher" or "gaussian") from ``generator``.
    """
    if estimator not in _ESTIMATORS:
        raise ValueError(f"torchjac.divergence: estimator expected one of {_ESTIMATORS}, got {estimator!r}")
    call = _prepare("divergence", f, x, cond)
    if call.spec.d_out != call.spec.d_in:
        raise ValueError(f"torchjac.divergence: f must map d_in to d_in features for a divergence, "
                         f"but f maps {call.spec.d_in} -> {call.spec.d_out}")
    if estimator == "exact":
        y, div = torch.ops.torchjac.mlp_divergence(*call.args())
    else:
        if noise not in _NOISES:
            raise ValueError(f"torchjac.divergence: noise expected one of {_NOISES}, got {noise!r}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
            raise ValueError(f"torchjac.divergence: num_samples expected a positive int, got {num_samples!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"torchjac.divergence: generator expected a torch.Generator, got "
                            f"{type(generator).__name__}")
        e = _noise((*call.x.shape[:-1], num_samples, call.spec.d_in), call.x, noise, generator)
        y, div = torch.ops.torchjac.mlp_hutchinson(*call.args(), e)
    return (y, div) if return_output else div


def jvp(f, x: torch.Tensor, v: torch.Tensor, *, cond: Optional[torch.Tensor] = None, return_output: bool = False):
    """Per-point Jacobian-vector product ``J v`` of shape ``(..., d_out)``; v broadcasts against x."""
    call = _prepare("jvp", f, x, cond)
    _check_tensor("jvp", "v", v, like=x)
    if v.shape[-1] != call.spec.d_in:
        raise ValueError(f"torchjac.jvp: v expected last dim {call.spec.d_in} like x, got shape {tuple(v.shape)}")
    lead = call.x.shape[:-1]
    try:
        fits = torch.broadcast_shapes(v.shape[:-1], lead) == lead
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"torchjac.jvp: v expected leading dims that broadcast to {tuple(lead)} (x's and cond's), "
                         f"got shape {tuple(v.shape)}")
    tangents = v.expand(*lead, v.shape[-1]).unsqueeze(-2)
    y, out = torch.ops.torchjac.mlp_jvp(*call.args(), tangents)
    out = out.squeeze(-2)
    return (y, out) if return_output else out
