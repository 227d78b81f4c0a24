"""The supported activations: code, parameters, value and derivatives.

This is the only Python source of the activation math. Each activation is a
code (an int passed to the ops) and two float parameters. ``derivatives`` gives
the value and the derivatives a pass asks for at once, sharing their work (one
tanh serves Tanh's value and all its derivatives): the forward-tangent pass asks
for orders 0 and 1, the reverse pass through the tangents and the second-order
(Laplacian, Hessian) pass for order 2 as well, the reverse of the second-order
pass for order 3. All are written with differentiable ops, so autograd through
them gives the next order (double backward). The CUDA kernels mirror the value
and the first two derivatives in ``csrc/cuda/activations.cuh`` (the fused
backward of second order, which would need the third, does not exist yet).

Each derivative matches the one PyTorch's own autograd uses, including the
choice at kinks: ReLU'(0) = 0, LeakyReLU'(0) = slope, ELU'(0) = alpha but
ELU''(0) = 0, and Softplus' = 1 when beta*z > threshold but Softplus'' = 0
already when beta*z >= threshold. The third derivative keeps the second's
choice: it is 0 where Softplus'' is, and ELU's is 0 at 0.

One deliberate difference: at a NaN pre-activation the slope is NaN for every
activation (the higher derivatives of ReLU, LeakyReLU and Identity are 0 there).
PyTorch's ReLU and LeakyReLU backward give 0 or the slope there, which would
turn a NaN point into a finite, wrong Jacobian. The CUDA copy has the same rule.
"""
import math
from enum import IntEnum

import torch
import torch.nn.functional as F
from torch import nn


class Act(IntEnum):
    IDENTITY = 0
    RELU = 1
    LEAKY_RELU = 2   # p0 = negative_slope
    SOFTPLUS = 3     # p0 = beta, p1 = threshold
    SILU = 4
    GELU = 5         # exact, with the normal CDF
    GELU_TANH = 6    # approximate="tanh"
    TANH = 7
    SIGMOID = 8
    ELU = 9          # p0 = alpha
    SINE = 10        # p0 = w0


class Sine(nn.Module):
    """SIREN activation ``sin(w0 * x)``."""

    def __init__(self, w0: float = 30.0):
        super().__init__()
        self.w0 = float(w0)

    def forward(self, x):
        return torch.sin(self.w0 * x)

    def extra_repr(self):
        return f"w0={self.w0}"


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_GELU_TANH_C = 0.044715


def _identity(z, p0, p1):
    return {0: lambda: z, 1: lambda: torch.ones_like(z), 2: lambda: torch.zeros_like(z),
            3: lambda: torch.zeros_like(z)}


def _relu(z, p0, p1):  # the inner where passes a NaN z through
    return {0: lambda: F.relu(z), 1: lambda: torch.where(z > 0, 1.0, torch.where(z <= 0, 0.0, z)),
            2: lambda: torch.zeros_like(z), 3: lambda: torch.zeros_like(z)}


def _leaky_relu(z, p0, p1):
    return {0: lambda: F.leaky_relu(z, p0), 1: lambda: torch.where(z > 0, 1.0, torch.where(z <= 0, p0, z)),
            2: lambda: torch.zeros_like(z), 3: lambda: torch.zeros_like(z)}


def _softplus(z, p0, p1):
    bz = z if p0 == 1.0 else z * p0
    s = torch.sigmoid(bz)
    return {0: lambda: F.softplus(z, p0, p1), 1: lambda: torch.where(bz > p1, 1.0, s),
            2: lambda: torch.where(bz >= p1, 0.0, p0 * s * (1 - s)),
            3: lambda: torch.where(bz >= p1, 0.0, (p0 * p0) * s * (1 - s) * (1 - 2 * s))}


def _silu(z, p0, p1):
    s = torch.sigmoid(z)
    return {0: lambda: F.silu(z), 1: lambda: s * (1 + z * (1 - s)),
            2: lambda: s * (1 - s) * (2 + z * (1 - 2 * s)),
            3: lambda: s * (1 - s) * ((1 - 2 * s) * (3 + z * (1 - 2 * s)) - 2 * z * s * (1 - s))}


def _gelu(z, p0, p1):
    pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
    return {0: lambda: F.gelu(z), 1: lambda: 0.5 * (1 + torch.erf(z * _INV_SQRT_2)) + z * pdf,
            2: lambda: pdf * (2 - z * z), 3: lambda: pdf * z * (z * z - 4)}


def _gelu_tanh(z, p0, p1):
    u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z ** 3)
    du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
    ddu = _SQRT_2_OVER_PI * 6 * _GELU_TANH_C * z
    dddu = _SQRT_2_OVER_PI * 6 * _GELU_TANH_C
    t = torch.tanh(u)
    sech2 = 1 - t * t
    inner = du + 0.5 * z * (ddu - 2 * t * du * du)  # the second derivative is sech2 * inner

    def third():
        d_inner = 1.5 * ddu - t * du * du + 0.5 * z * (dddu - 2 * sech2 * du ** 3 - 4 * t * du * ddu)
        return sech2 * (d_inner - 2 * t * du * inner)
    return {0: lambda: F.gelu(z, approximate="tanh"), 1: lambda: 0.5 * (1 + t) + 0.5 * z * sech2 * du,
            2: lambda: sech2 * inner, 3: third}


def _tanh(z, p0, p1):
    t = torch.tanh(z)
    sech2 = 1 - t * t
    return {0: lambda: t, 1: lambda: sech2, 2: lambda: -2 * t * sech2, 3: lambda: sech2 * (6 * t * t - 2)}


def _sigmoid(z, p0, p1):
    s = torch.sigmoid(z)
    slope = s * (1 - s)
    return {0: lambda: s, 1: lambda: slope, 2: lambda: slope * (1 - 2 * s), 3: lambda: slope * (1 - 6 * s + 6 * s * s)}


def _elu(z, p0, p1):
    e = p0 * torch.exp(z)
    return {0: lambda: F.elu(z, p0), 1: lambda: torch.where(z > 0, 1.0, e), 2: lambda: torch.where(z >= 0, 0.0, e),
            3: lambda: torch.where(z >= 0, 0.0, e)}


def _sine(z, p0, p1):
    wz = p0 * z
    return {0: lambda: torch.sin(wz), 1: lambda: p0 * torch.cos(wz), 2: lambda: -(p0 * p0) * torch.sin(wz),
            3: lambda: -(p0 ** 3) * torch.cos(wz)}


# Per code: (z, p0, p1) -> {order: thunk}; what the thunks share is computed once, before them.
_DERIVATIVE_TABLES = {Act.IDENTITY: _identity, Act.RELU: _relu, Act.LEAKY_RELU: _leaky_relu, Act.SOFTPLUS: _softplus,
           Act.SILU: _silu, Act.GELU: _gelu, Act.GELU_TANH: _gelu_tanh, Act.TANH: _tanh, Act.SIGMOID: _sigmoid,
           Act.ELU: _elu, Act.SINE: _sine}


def derivatives(code: int, p0: float, p1: float, z: torch.Tensor, orders) -> tuple:
    """The activation's value (order 0) and derivatives d^n value / d z^n (orders 1 to 3) at z, one per order
    asked for, computing what they share once: one tanh gives Tanh's value and every derivative.

    Written with differentiable ops, so autograd through order n gives order n + 1.
    """
    terms = _DERIVATIVE_TABLES.get(code)
    if terms is None:
        raise ValueError(f"unknown activation code {code}")
    table = terms(z, p0, p1)
    return tuple(table[n]() for n in orders)


def value(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    return derivatives(code, p0, p1, z, (0,))[0]


def derivative(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    """d value / d z."""
    return derivatives(code, p0, p1, z, (1,))[0]


def second_derivative(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    """d² value / d z², used by the reverse pass through the tangents and the second-order pass."""
    return derivatives(code, p0, p1, z, (2,))[0]


def third_derivative(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    """d³ value / d z³, used by the reverse of the second-order pass (Laplacian, Hessian)."""
    return derivatives(code, p0, p1, z, (3,))[0]


SUPPORTED_MODULES = (nn.Identity, nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.SiLU, nn.GELU,
                     nn.Tanh, nn.Sigmoid, nn.ELU, Sine)


_FACTORIES = {
    "identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "softplus": nn.Softplus,
    "silu": nn.SiLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "elu": nn.ELU, "sine": Sine,
}


def module_from_name(name: str) -> nn.Module:
    """A fresh activation module for a name such as "softplus", with PyTorch's default parameters."""
    factory = _FACTORIES.get(name.lower())
    if factory is None:
        raise ValueError(f"activation expected one of {sorted(_FACTORIES)} or an activation module, got {name!r}")
    return factory()


def computes_as(module: nn.Module, base: type) -> bool:
    """Whether module is a base and computes what base does: a subclass with its own forward does not."""
    return isinstance(module, base) and type(module).forward is base.forward


def encode(module: nn.Module):
    """(code, p0, p1) of an activation module, or None if it is not a supported activation (or a subclass of
    one with a forward of its own)."""
    base = next((cls for cls in SUPPORTED_MODULES if isinstance(module, cls)), None)
    if base is None or not computes_as(module, base):
        return None
    if isinstance(module, nn.Identity):
        return Act.IDENTITY, 0.0, 0.0
    if isinstance(module, nn.ReLU):
        return Act.RELU, 0.0, 0.0
    if isinstance(module, nn.LeakyReLU):
        return Act.LEAKY_RELU, float(module.negative_slope), 0.0
    if isinstance(module, nn.Softplus):
        return Act.SOFTPLUS, float(module.beta), float(module.threshold)
    if isinstance(module, nn.SiLU):
        return Act.SILU, 0.0, 0.0
    if isinstance(module, nn.GELU):
        return (Act.GELU_TANH if module.approximate == "tanh" else Act.GELU), 0.0, 0.0
    if isinstance(module, nn.Tanh):
        return Act.TANH, 0.0, 0.0
    if isinstance(module, nn.Sigmoid):
        return Act.SIGMOID, 0.0, 0.0
    if isinstance(module, nn.ELU):
        return Act.ELU, float(module.alpha), 0.0
    if isinstance(module, Sine):
        return Act.SINE, float(module.w0), 0.0
    return None

