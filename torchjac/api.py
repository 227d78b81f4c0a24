"""The public functions: jacobian, divergence, jvp, laplacian and hessian of a point-wise model, and explain.

Each call takes one of two paths. The fused path lowers f to the ops' MLP
description (torchjac/spec.py) and calls a torchjac op. The generic path
(torchjac/generic.py) serves every other point-wise callable.
"""
import inspect
from typing import NamedTuple, Optional

import torch
import torch.autograd.forward_ad as forward_ad
from torch import nn
from torch._C._functorch import is_functorch_wrapped_tensor

from . import generic, reference
from . import spec as spec_lib
from . import encoding as encoding_lib
from .mlp import PointMLP, broadcast_cat
from .trace import NotFusable

_ESTIMATORS = ("exact", "hutchinson")
_NOISES = ("rademacher", "gaussian")


class _Fused(NamedTuple):
    x: torch.Tensor      # (*lead, d_in), channels-last, expanded to the broadcast leading shape
    cond: torch.Tensor   # (*lead_c, c) with the same ndim as x, c may be 0
    spec: spec_lib.MLPSpec

    def call(self, mode: str, *extra):
        """(y, out) of mode: the op mlp_<mode>, or with an input encoding the op composed with it."""
        if self.spec.encoding is not None:
            return encoding_lib.compose(self.spec.encoding, self.op, mode, self.x, *extra)
        return self.op(mode, self.x, *extra)

    def op(self, mode: str, x: torch.Tensor, *extra):
        """(y, out) of the op mlp_<mode> on x. When autograd will need its backward, the op keeps the states that
        backward reuses (the pure-PyTorch reverse mode's pre-activations z), as autograd keeps a graph's."""
        args = (x, self.cond, *self.spec.op_args())
        cond, weights, biases = args[1:4]
        keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, cond, *weights, *biases, *extra))
        y, out, _states = getattr(torch.ops.torchjac, f"mlp_{mode}")(*args, *extra, keep)
        return y, out

    def output(self, y: torch.Tensor) -> torch.Tensor:
        """y in the model's own layout."""
        return y.movedim(-1, -2) if self.spec.layout == spec_lib.CHANNELS_FIRST else y


def _check_tensor(fn: str, name: str, t, like: Optional[torch.Tensor] = None, scalar_ok: bool = False):
    if not torch.is_tensor(t):
        raise TypeError(f"torchjac.{fn}: {name} expected a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"torchjac.{fn}: {name} expected a floating-point tensor, got dtype {t.dtype}")
    if t.dim() < 1 and not scalar_ok:
        raise ValueError(f"torchjac.{fn}: {name} expected shape (..., features), got a 0-dim tensor")
    if like is not None and (t.dtype != like.dtype or t.device != like.device):
        raise ValueError(f"torchjac.{fn}: {name} expected dtype {like.dtype} on {like.device} like x, "
                         f"got dtype {t.dtype} on {t.device}")


def _check_event_dims(fn, event_dims, x):
    if isinstance(event_dims, bool) or not isinstance(event_dims, int) or not 1 <= event_dims <= x.dim():
        raise ValueError(f"torchjac.{fn}: event_dims expected an int in [1, x.dim()={x.dim()}], got {event_dims!r}")


def _check_call(fn: str, f, has_cond: bool):
    """Raise a clear error when f cannot be called the way torchjac calls it.

    torchjac calls f(x), or f(x, cond) with cond; an nn.Sequential receives cat([x, cond]).
    """
    if spec_lib.is_plain_sequential(f):
        return
    overrides_call = isinstance(f, nn.Module) and type(f).__call__ is not nn.Module.__call__
    target = f.forward if isinstance(f, nn.Module) and not overrides_call else f
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):  # a builtin: nothing to check
        return
    name = f"{type(f).__name__}.forward" if target is not f else getattr(f, "__name__", type(f).__name__)
    positional = [p for p in signature.parameters.values()
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if isinstance(f, nn.Sequential):
        # A subclass with its own forward is still called on cat([x, cond]); one that takes a second input
        # would expect cond there.
        if has_cond and len(positional) >= 2:
            raise ValueError(f"torchjac.{fn}: {name}{signature} takes a second input, but torchjac calls an "
                             f"nn.Sequential on cat([x, cond], -1); pass `lambda x, cond: model(x, cond)` as f")
        return
    call = "f(x, cond)" if has_cond else "f(x)"
    if (len(positional) >= 2 and positional[0].name in ("t", "time")
            and positional[1].default is inspect.Parameter.empty):
        # torchdiffeq's and FFJORD's dynamics take (t, y); called as f(x, cond) they would get the points as t.
        raise ValueError(f"torchjac.{fn}: {name}{signature} takes the time first, but torchjac calls {call} with "
                         f"the points first; pass the points as x, the time as cond, and "
                         f"x_arg={positional[1].name!r} (the parameter that receives x)")
    try:
        signature.bind(*(("x", "cond") if has_cond else ("x",)))
    except TypeError as e:
        hint = ("pass a model whose forward takes (x, cond), or concatenate cond into x yourself"
                if has_cond else "pass cond=..., or wrap the model in a function of x alone")
        raise ValueError(f"torchjac.{fn}: torchjac calls {call}, but {name}{signature} cannot be called so "
                         f"({e}); {hint}") from None


class XSecond(nn.Module):
    """f(cond, x) as a module of (x, cond): torchdiffeq's and FFJORD's forward(t, y), given x_arg.

    torch.fx traces through it into f's own forward, so f runs fused wherever f(x, cond) would. One is made per
    model and kept in the model's ``__dict__`` (not as a submodule: state_dict and modules() are unchanged), so
    torch.compile sees the same module at every call; the cycle between them is freed with the model.
    """

    def __init__(self, f):
        super().__init__()
        self.f = f
        self.model_name = f"{type(f).__name__}, called as f(cond, x),"

    def forward(self, x, cond):
        return self.f(cond, x)


def _place_x(fn: str, f, x_arg, has_cond: bool):
    """f as torchjac calls it, f(x) or f(x, cond), where x_arg names which of f's two inputs is x."""
    if x_arg is None:
        return f
    if not has_cond:
        raise ValueError(f"torchjac.{fn}: x_arg says which of f's two inputs is x; pass the other one as cond")
    if isinstance(f, nn.Sequential):
        raise ValueError(f"torchjac.{fn}: x_arg given, but torchjac calls an nn.Sequential on cat([x, cond], -1); "
                         f"leave x_arg unset")
    target = f.forward if isinstance(f, nn.Module) else f
    try:
        names = [p.name for p in inspect.signature(target).parameters.values()
                 if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)][:2]
    except (TypeError, ValueError):
        names = None
    if isinstance(x_arg, str) and names is not None and x_arg in names:
        position = names.index(x_arg)
    elif isinstance(x_arg, int) and not isinstance(x_arg, bool) and x_arg in (0, 1):
        position = x_arg
    else:
        expected = f"0, 1 or one of the names {names}" if names is not None else "0 or 1"
        raise ValueError(f"torchjac.{fn}: x_arg expected the position or the name of f's parameter that receives "
                         f"x ({expected}), got {x_arg!r}")
    if position == 0:
        return f
    if not isinstance(f, nn.Module):
        return lambda x, cond: f(cond, x)
    wrapper = f.__dict__.get("_torchjac_x_second")
    if wrapper is None:
        wrapper = XSecond(f)
        object.__setattr__(f, "_torchjac_x_second", wrapper)  # bypasses nn.Module's submodule registration
    return wrapper


def _transformed(tensors) -> bool:
    """Whether torch.func (vmap, grad, jvp, ...) or forward-mode AD may see the tensors.

    The fused ops have reverse-mode autograd only, so such calls take the generic path, which is
    built from torch.func and composes with every transform.
    """
    # Dynamo cannot trace the wrapped-tensor test (nor tell an active transform apart), so a transform
    # inside a compiled region reaches the fused op, which then raises PyTorch's own error.
    if not torch.compiler.is_compiling() and any(is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    return any(forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _route(fn: str, f, x, cond, event_dims, chunk_size=None, extra=()):
    """(x, fused call) for f; the fused call is None when the generic path computes f.

    With event_dims=1 and a cond whose leading dims broadcast beyond x's, x comes back expanded.
    ``extra`` are the other tensors the op would read (jvp tangents, noise).
    """
    _check_tensor(fn, "x", x)
    user_cond = cond  # as f receives it (its cond program, if any, runs on it)
    if cond is not None:
        _check_tensor(fn, "cond", cond, like=x, scalar_ok=True)
        if cond.dim() == 0:  # one number for all points, as torchdiffeq passes t
            cond = cond.reshape(1)
    _check_event_dims(fn, event_dims, x)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"torchjac.{fn}: chunk_size expected a positive int or None, got {chunk_size!r}")
    if not callable(f):
        raise TypeError(f"torchjac.{fn}: f expected a callable (an nn.Module or a function), got "
                        f"{type(f).__name__}")
    if isinstance(f, nn.parallel.DistributedDataParallel):
        # DDP synchronizes the gradients of what its own forward computes; torchjac's passes would bypass it.
        raise TypeError(f"torchjac.{fn}: f is a DistributedDataParallel wrapper, whose gradients would not be "
                        f"synchronized; call torchjac.{fn} on the wrapped model inside the forward of the "
                        f"module you wrap in DistributedDataParallel (see the README, Distributed training)")
    spec_lib.refuse_point_mixing(fn, f, event_dims, x.dim())
    _check_call(fn, f, cond is not None)
    c = 0 if cond is None else cond.shape[-1]
    if isinstance(f, PointMLP) and f.cond_features != c:
        if cond is None:
            raise ValueError(f"torchjac.{fn}: f is a PointMLP with cond_features={f.cond_features}; "
                             f"pass cond of shape (..., {f.cond_features})")
        if f.cond_features == 0:
            raise ValueError(f"torchjac.{fn}: cond given, but f is a PointMLP with cond_features=0")
        raise ValueError(f"torchjac.{fn}: cond expected last dim {f.cond_features} (f.cond_features), "
                         f"got shape {tuple(cond.shape)}")
    if event_dims != 1:
        return x, None
    channels_first = isinstance(f, nn.Sequential) and spec_lib.sequential_layout(f) == spec_lib.CHANNELS_FIRST
    if channels_first:
        if x.dim() not in (2, 3):
            raise ValueError(f"torchjac.{fn}: a stack of Conv1d layers takes x of shape (B, C, N) or (C, N), "
                             f"got shape {tuple(x.shape)}")
        x = x.movedim(-2, -1)
        if cond is not None:
            if cond.dim() != x.dim():
                raise ValueError(f"torchjac.{fn}: with Conv1d layers cond expected shape (B, c, N or 1) like x, "
                                 f"got shape {tuple(cond.shape)}")
            cond = cond.movedim(-2, -1)
            c = cond.shape[-1]
    x, cond = _broadcast_points(fn, x, cond)
    try:
        spec = spec_lib.lower(f, x, c, user_cond)
    except NotFusable as e:
        if channels_first:  # no generic fallback: the generic path needs features in the last dim
            raise ValueError(f"torchjac.{fn}: {e}; a channels-first Conv1d stack has no generic fallback") from None
        return x, None
    except ValueError as e:
        raise ValueError(f"torchjac.{fn}: {e}") from None
    if spec.encoding is not None and fn in ("laplacian", "hessian"):
        return x, None  # no fused second order through an encoding yet: exact on the generic path
    fused = _fused_call(fn, x, cond, spec)
    if _transformed([x, cond, *spec.weights, *spec.biases, *extra]):
        if channels_first:
            raise ValueError(f"torchjac.{fn}: torch.func transforms and forward-mode AD over a channels-first "
                             f"Conv1d stack are not supported (the generic path that serves them needs features "
                             f"in the last dim); move the features last and use nn.Linear layers")
        return x, None
    return x, fused


def _broadcast_points(fn, x, cond):
    """x expanded to the leading shape it shares with cond; cond with x's ndim (its dims 1 or x's)."""
    if cond is None:
        return x, x.new_zeros((1,) * (x.dim() - 1) + (0,))
    try:
        lead = torch.broadcast_shapes(x.shape[:-1], cond.shape[:-1])
    except RuntimeError:
        raise ValueError(f"torchjac.{fn}: cond's leading dims {tuple(cond.shape[:-1])} do not broadcast "
                         f"against x's {tuple(x.shape[:-1])}") from None
    if tuple(x.shape[:-1]) != tuple(lead):
        x = x.expand(*lead, x.shape[-1])
    return x, cond.reshape((1,) * (len(lead) + 1 - cond.dim()) + tuple(cond.shape))


def _fused_call(fn, x, cond, spec) -> _Fused:
    if x.shape[-1] != spec.d_in:
        c = spec.cond_features
        raise ValueError(f"torchjac.{fn}: x expected last dim {spec.d_in} (f's input features"
                         f"{f' minus cond_features={c}' if c else ''}), got shape {tuple(x.shape)}")
    for p in spec.weights + spec.biases:
        if p.dtype != x.dtype or p.device != x.device:
            raise ValueError(f"torchjac.{fn}: x has dtype {x.dtype} on {x.device}, but f's parameters have dtype "
                             f"{p.dtype} on {p.device}; move one to match the other")
    return _Fused(x, cond, spec)


def _generic(f, compute, *args):
    """compute(*args) on the generic path, which calls f inside torch.func transforms.

    The older weight_norm's hook assigns the weight it computes to the module on every call; inside a
    transform that is a wrapped tensor, which must not outlive the call (torch.compile cannot trace it
    out), so the attributes are put back as they were.
    """
    kept = spec_lib.weight_norm_attributes(f)
    try:
        return compute(*args)
    finally:
        for module, name, value in kept:
            setattr(module, name, value)


def _generic_model(f, cond):
    """f as a function of x alone: an nn.Sequential receives cat([x, cond]), anything else f(x, cond)."""
    if cond is None:
        return f
    if isinstance(f, nn.Sequential):
        return lambda x: f(broadcast_cat(x, cond.reshape(1) if cond.dim() == 0 else cond))
    return lambda x: f(x, cond)


def _output_rows(fn: str, outputs, d_out: int) -> list:
    """The output features `outputs` (a slice or a sequence of ints) names, as a list of indices."""
    if isinstance(outputs, slice):
        rows = list(range(d_out))[outputs]
    elif isinstance(outputs, (list, tuple, range)) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in outputs):
        if any(not -d_out <= i < d_out for i in outputs):
            raise ValueError(f"torchjac.{fn}: outputs expected indices of f's {d_out} output features, got "
                             f"{list(outputs)}")
        rows = [i % d_out for i in outputs]
    else:
        raise TypeError(f"torchjac.{fn}: outputs expected a slice or a sequence of ints (e.g. slice(0, 1) for an "
                        f"SDF's distance), got {type(outputs).__name__}")
    if not rows:
        raise ValueError(f"torchjac.{fn}: outputs={outputs!r} selects none of f's {d_out} output features")
    return rows


def jacobian(f, x: torch.Tensor, *, cond: Optional[torch.Tensor] = None, return_output: bool = False,
             event_dims: int = 1, chunk_size: Optional[int] = None, outputs=None, x_arg=None):
    """Per-point Jacobian ``J[..., i, j] = d f(x)_i / d x_j`` of shape ``(..., d_out, d_in)``.

    f is a ``torchjac.PointMLP`` (called as ``f(x, cond)``), an ``nn.Sequential`` of Linear layers and
    supported activations (called on ``cat([x, cond], -1)``), a module torch.fx recognizes as such an MLP,
    or any point-wise callable (generic path). ``cond`` has shape ``(..., c)`` and broadcasts against
    ``x.shape[:-1]``; it is not differentiated in J but receives gradients when training.
    ``event_dims`` trailing dims of x form one point (then J has shape ``(*batch, *out_event, *in_event)``);
    ``chunk_size`` bounds how many basis vectors the generic path batches at once.
    With ``return_output=True`` returns ``(f(x), J)`` from the same pass. For an ``nn.Sequential`` of
    ``Conv1d(kernel_size=1)`` layers, x is channels-first ``(B, C_in, N)``, ``f(x)`` keeps that layout and J is
    per point: ``(B, N, C_out, C_in)``.

    The fused path takes the cheaper direction, for J and for its training backward: forward mode (``d_in``
    tangents per point) when ``d_out >= d_in``, reverse mode (``d_out`` cotangents, as for an SDF's gradient)
    when ``d_out < d_in``, except on a device with a fused forward-mode kernel (CUDA), which keeps that kernel.
    The generic path takes VJPs, and JVPs only when ``d_in < d_out`` outside autograd. ``torchjac.explain(f)``
    says which direction the fused path takes.

    ``x_arg`` says which of f's two inputs receives x when f takes cond first, as torchdiffeq's and FFJORD's
    ``forward(t, y)``: its position (1) or name (``x_arg="y"``); cond goes to the other. Every function takes it.

    ``outputs`` (a slice or a sequence of ints; ``event_dims=1``) asks for the rows of J of those output features
    only, ``(..., len(outputs), d_in)``: the gradient of an SDF's distance alone when the model also returns
    features (NeuS, IDR: ``outputs=slice(0, 1)``). The fused path then computes those outputs only, in the
    direction their number makes cheaper, and ``return_output=True`` returns those outputs of ``f(x)``, from the
    same pass.
    """
    if outputs is not None and event_dims != 1:
        raise ValueError(f"torchjac.jacobian: outputs selects output features of a point with event_dims=1, got "
                         f"event_dims={event_dims}")
    f = _place_x("jacobian", f, x_arg, cond is not None)
    x, fused = _route("jacobian", f, x, cond, event_dims, chunk_size)
    if fused is None:
        y, jac = _generic(f, generic.jacobian, "jacobian", _generic_model(f, cond), x, event_dims,
                          chunk_size)
        jac = _nan_at_non_finite_points(jac, x, cond, event_dims)
        if outputs is not None:
            rows = _output_rows("jacobian", outputs, jac.shape[-2])
            y, jac = y[..., rows], jac[..., rows, :]
    else:
        if outputs is not None:
            fused = fused._replace(spec=fused.spec.select_outputs(_output_rows("jacobian", outputs, fused.spec.d_out)))
        y, jac = fused.call(fused.spec.jacobian_mode(x.device))
        y = fused.output(y)
    return (y, jac) if return_output else jac


def _noise(shape, x: torch.Tensor, kind: str, generator: Optional[torch.Generator]) -> torch.Tensor:
    device = generator.device if generator is not None else x.device
    if kind == "rademacher":
        e = torch.randint(0, 2, shape, generator=generator, device=device, dtype=x.dtype) * 2 - 1
    else:
        e = torch.randn(shape, generator=generator, device=device, dtype=x.dtype)
    return e.to(x.device)


def _check_estimator(fn, estimator, noise, num_samples, generator, x) -> Optional[torch.Tensor]:
    """Checks the estimator arguments of divergence and laplacian; returns the user's noise tensor as
    (S, *x.shape), a constant (not differentiated), or None when torchjac draws the noise."""
    if estimator not in _ESTIMATORS:
        raise ValueError(f"torchjac.{fn}: estimator expected one of {_ESTIMATORS}, got {estimator!r}")
    if not torch.is_tensor(noise):
        if estimator == "hutchinson":
            if noise not in _NOISES:
                raise ValueError(f"torchjac.{fn}: noise expected one of {_NOISES} or a tensor of noise vectors, "
                                 f"got {noise!r}")
            if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
                raise ValueError(f"torchjac.{fn}: num_samples expected a positive int, got {num_samples!r}")
            if generator is not None and not isinstance(generator, torch.Generator):
                raise TypeError(f"torchjac.{fn}: generator expected a torch.Generator, got "
                                f"{type(generator).__name__}")
        return None
    if estimator != "hutchinson":
        raise ValueError(f"torchjac.{fn}: a noise tensor is only used with estimator=\"hutchinson\", "
                         f"got estimator={estimator!r}")
    _check_tensor(fn, "noise", noise, like=x)
    if num_samples != 1 or generator is not None:
        raise ValueError(f"torchjac.{fn}: num_samples and generator describe noise that torchjac draws; "
                         "with a noise tensor, its first dim is the number of samples")
    samples = noise.unsqueeze(0) if noise.dim() == x.dim() else noise
    if samples.dim() != x.dim() + 1 or tuple(samples.shape[1:]) != tuple(x.shape):
        raise ValueError(f"torchjac.{fn}: noise expected shape {tuple(x.shape)} (x's) or "
                         f"{('num_samples', *x.shape)}, got {tuple(noise.shape)}")
    if samples.shape[0] == 0:
        raise ValueError(f"torchjac.{fn}: noise expected at least one sample, got shape {tuple(noise.shape)}")
    return samples.detach()


def _generic_noise(user_noise, x, kind, num_samples, generator) -> torch.Tensor:
    """The generic path's noise, (S, *x.shape)."""
    if user_noise is None:
        return _noise((num_samples, *x.shape), x, kind, generator)
    return _expand_noise(user_noise, x)


def _fused_noise(fused: _Fused, user_noise, kind, num_samples, generator) -> torch.Tensor:
    """The op's noise, (*lead, S, d_in): drawn, or the user's (S, *x.shape) in f's layout."""
    if user_noise is None:
        return _noise((*fused.x.shape[:-1], num_samples, fused.spec.d_in), fused.x, kind, generator)
    if fused.spec.layout == spec_lib.CHANNELS_FIRST:
        user_noise = user_noise.movedim(-2, -1)
    return _expand_noise(user_noise, fused.x).movedim(0, -2)


def _expand_noise(samples: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(S, *x.shape) from noise of the user's x shape, x having been broadcast against cond on the left."""
    missing = x.dim() - (samples.dim() - 1)
    return samples.view(samples.shape[0], *[1] * missing, *samples.shape[1:]).expand(-1, *x.shape)


def _nan_at_non_finite_points(out: torch.Tensor, x: torch.Tensor, cond, event_dims: int) -> torch.Tensor:
    """The generic path's out with NaN at every point whose x (or cond) entries are not all finite.

    The fused path does this inside the ops.
    """
    poison = reference.non_finite_points(x, tuple(range(x.dim() - event_dims, x.dim())))
    if cond is not None and event_dims == 1:
        poison = poison + reference.non_finite_points(cond, -1)
    return out + poison.reshape(poison.shape + (1,) * (out.dim() - poison.dim()))


def divergence(f, x: torch.Tensor, *, cond: Optional[torch.Tensor] = None, estimator: str = "exact",
               num_samples: int = 1, noise: str = "rademacher", generator: Optional[torch.Generator] = None,
               return_output: bool = False, event_dims: int = 1, chunk_size: Optional[int] = None,
               x_arg=None):
    """Per-point divergence (trace of the Jacobian), shape ``x.shape[:-event_dims]``. Needs ``d_out == d_in``.

    ``estimator="hutchinson"`` returns the unbiased estimate ``mean_s e_s^T J e_s`` over ``num_samples``
    noise vectors per point, drawn as ``noise`` ("rademacher" or "gaussian") from ``generator``. ``noise`` may
    instead be a tensor of noise vectors, of shape ``x.shape`` or ``(S, *x.shape)``, for instance to reuse one
    draw over every step of an ODE solve (FFJORD); it is a constant and is not differentiated.
    """
    f = _place_x("divergence", f, x_arg, cond is not None)
    user_noise = _check_estimator("divergence", estimator, noise, num_samples, generator, x)
    x, fused = _route("divergence", f, x, cond, event_dims, chunk_size,
                      extra=() if user_noise is None else (user_noise,))
    if fused is None:
        model = _generic_model(f, cond)
        if estimator == "exact":
            y, div = _generic(f, generic.divergence, "divergence", model, x, event_dims, chunk_size)
        else:
            e = _generic_noise(user_noise, x, noise, num_samples, generator)
            y, div = _generic(f, generic.hutchinson, "divergence", model, x, event_dims, e, chunk_size)
        div = _nan_at_non_finite_points(div, x, cond, event_dims)
        return (y, div) if return_output else div
    if fused.spec.d_out != fused.spec.d_in:
        raise ValueError(f"torchjac.divergence: f must map d_in to d_in features for a divergence, "
                         f"but f maps {fused.spec.d_in} -> {fused.spec.d_out}")
    if estimator == "exact":
        y, div = fused.call("divergence")
    else:
        y, div = fused.call("hutchinson", _fused_noise(fused, user_noise, noise, num_samples, generator))
    y = fused.output(y)
    return (y, div) if return_output else div


def laplacian(f, x: torch.Tensor, *, cond: Optional[torch.Tensor] = None, estimator: str = "exact",
              num_samples: int = 1, noise: str = "rademacher", generator: Optional[torch.Generator] = None,
              return_output: bool = False, event_dims: int = 1, x_arg=None):
    """Per-point Laplacian of each output, ``L[..., i] = sum_j d² f(x)_i / d x_j²``, shaped like ``f(x)``.

    The fused path computes it exactly in one forward pass that carries, with each point's value, its
    ``d_in`` tangents and one collapsed second-order row. ``estimator="hutchinson"`` returns the unbiased
    estimate ``mean_s e_s^T H_i e_s`` over ``num_samples`` noise vectors per point, drawn and passed as for
    ``divergence`` (``noise``, ``generator``, or a noise tensor of shape ``x.shape`` or ``(S, *x.shape)``).
    ``cond`` is not differentiated in L but receives gradients when training. With ``event_dims`` trailing dims
    per point, the sum runs over all of a point's input entries, and L has shape ``(*batch, *out_event)``.
    """
    f = _place_x("laplacian", f, x_arg, cond is not None)
    user_noise = _check_estimator("laplacian", estimator, noise, num_samples, generator, x)
    x, fused = _route("laplacian", f, x, cond, event_dims, extra=() if user_noise is None else (user_noise,))
    if fused is None:
        model = _generic_model(f, cond)
        if estimator == "exact":
            y, lap = _generic(f, generic.laplacian, "laplacian", model, x, event_dims)
        else:
            e = _generic_noise(user_noise, x, noise, num_samples, generator)
            y, lap = _generic(f, generic.laplacian_hutchinson, "laplacian", model, x, event_dims, e)
        lap = _nan_at_non_finite_points(lap, x, cond, event_dims)
        return (y, lap) if return_output else lap
    if estimator == "exact":
        y, lap = fused.call("laplacian")
    else:
        y, lap = fused.call("laplacian_hutchinson", _fused_noise(fused, user_noise, noise, num_samples, generator))
    y, lap = fused.output(y), fused.output(lap)
    return (y, lap) if return_output else lap


def hessian(f, x: torch.Tensor, *, cond: Optional[torch.Tensor] = None, return_output: bool = False,
            event_dims: int = 1, x_arg=None):
    """Per-point Hessian of each output, ``H[..., i, j, k] = d² f(x)_i / d x_j d x_k``, of shape
    ``(..., d_out, d_in, d_in)``; with ``event_dims`` trailing dims per point ``(*batch, *out_event, *in_event,
    *in_event)``. For a channels-first Conv1d stack H is per point, ``(B, N, C_out, C_in, C_in)``, like J.

    The fused path carries, with each point's value and ``d_in`` tangents, one second-order row per pair
    ``j <= k``: ``d_in (d_in + 1) / 2`` rows. For the Laplacian alone, ``laplacian`` carries one.
    """
    f = _place_x("hessian", f, x_arg, cond is not None)
    x, fused = _route("hessian", f, x, cond, event_dims)
    if fused is None:
        y, hess = _generic(f, generic.hessian, "hessian", _generic_model(f, cond), x, event_dims)
        hess = _nan_at_non_finite_points(hess, x, cond, event_dims)
    else:
        y, hess = fused.call("hessian")
        y = fused.output(y)
    return (y, hess) if return_output else hess


def jvp(f, x: torch.Tensor, v: torch.Tensor, *, cond: Optional[torch.Tensor] = None, return_output: bool = False,
        event_dims: int = 1, x_arg=None):
    """Per-point Jacobian-vector product ``J v``, shaped like f(x); v broadcasts against x."""
    f = _place_x("jvp", f, x_arg, cond is not None)
    _check_tensor("jvp", "v", v, like=x)
    x, fused = _route("jvp", f, x, cond, event_dims, extra=(v,))
    if fused is None:
        try:
            v = v.expand_as(x)
        except RuntimeError:
            raise ValueError(f"torchjac.jvp: v expected a shape that broadcasts to x's {tuple(x.shape)}, "
                             f"got {tuple(v.shape)}") from None
        y, out = _generic(f, generic.jvp, "jvp", _generic_model(f, cond), x, event_dims, v)
        out = _nan_at_non_finite_points(out, x, cond, event_dims)
        return (y, out) if return_output else out
    if fused.spec.layout == spec_lib.CHANNELS_FIRST:
        if v.dim() < 2:  # a (C,) vector would broadcast against N, not C
            raise ValueError(f"torchjac.jvp: with Conv1d layers v expected shape (B, C, N), (C, N) or (C, 1), "
                             f"got shape {tuple(v.shape)}")
        v = v.movedim(-2, -1)
    if v.shape[-1] != fused.spec.d_in:
        raise ValueError(f"torchjac.jvp: v expected {fused.spec.d_in} features like x, got shape {tuple(v.shape)}")
    lead = fused.x.shape[:-1]
    try:
        fits = torch.broadcast_shapes(v.shape[:-1], lead) == lead
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"torchjac.jvp: v expected leading dims that broadcast to {tuple(lead)} (x's and cond's), "
                         f"got shape {tuple(v.shape)}")
    tangents = v.expand(*lead, v.shape[-1]).unsqueeze(-2)
    y, out = fused.call("jvp", tangents)
    y, out = fused.output(y), fused.output(out.squeeze(-2))
    return (y, out) if return_output else out


class Explanation(NamedTuple):
    path: str    # "fused", "generic" or "refused"
    detail: str  # what was recognized, or which layer or node stopped the fused path

    def __str__(self):
        return f"{self.path}: {self.detail}"


def explain(f, x: Optional[torch.Tensor] = None, *, cond=False, ndim: int = 2, x_arg=None) -> Explanation:
    """Which path computes f, and if not the fused one, which layer or node stopped it.

    ``cond=True`` explains the call ``f(x, cond)``, and with ``x_arg`` the call in the order it names, as the
    other functions take it. ``ndim`` is the number of dims of the x it explains the call for, (P, d_in) by
    default: a forward that concatenates along dim 1 concatenates features only then. With an example ``x``
    (and ``cond`` as a tensor), it explains the call on those shapes, as a forward that branches on its input's
    shape (DeepSDF) needs; ndim is then x's. With an example cond too, it also replays what the forward computes
    from cond, as the call does, so that weights of the wrong shape for the recipe show as the generic path.
    """
    has_cond = cond is not None and cond is not False
    shapes = call = None
    if x is not None:
        if not torch.is_tensor(x):
            raise TypeError(f"torchjac.explain: x expected an example input tensor, got {type(x).__name__}")
        if has_cond and not torch.is_tensor(cond):
            raise TypeError(f"torchjac.explain: with an example x, cond expected an example tensor too (or None), "
                            f"got {cond!r}")
        ndim = x.dim()
        shapes, call = spec_lib.call_shapes(x, cond if has_cond else None,
                                            (cond.shape[-1] if cond.dim() else 1) if has_cond else 0)
    placed = _place_x("explain", f, x_arg, has_cond)
    path, detail = spec_lib.explain(placed, has_cond, ndim, shapes, call)
    if path == "fused" and x is not None and has_cond and not isinstance(f, nn.Sequential):
        # What the forward computes from cond (a hypernetwork's weights) is known only on a cond: lower the
        # example call as the call would, so that shapes that do not fit say so here too.
        example_cond = cond.reshape(1) if cond.dim() == 0 else cond
        try:
            with torch.no_grad():
                spec_lib.lower(placed, x, example_cond.shape[-1], example_cond)
        except NotFusable as e:
            return Explanation("generic", f"{e} (on the example call)")
    return Explanation(path, detail)
