"""The supported activations: code, parameters, value and derivatives.

This is the only Python source of the activation math. Each activation is a
code (an int passed to the ops) and two float parameters. The forward-tangent
pass uses ``value`` and ``derivative``; the reverse pass through the tangents
and the second-order (Laplacian, Hessian) pass also need ``second_derivative``,
and the reverse of the second-order pass ``third_derivative``. All are written
with differentiable ops, so autograd through them gives the next order (double
backward). The CUDA
kernels mirror these formulas in ``csrc/cuda/activations.cuh``.

Each derivative matches the one PyTorch's own autograd uses, including the
choice at kinks: ReLU'(0) = 0, LeakyReLU'(0) = slope, ELU'(0) = alpha but
ELU''(0) = 0, and Softplus' = 1 when beta*z > threshold but Softplus'' = 0
already when beta*z >= threshold. The third derivative keeps the second's
choice: it is 0 where Softplus'' is, and ELU's is 0 at 0.

One deliberate difference: at a NaN pre-activation every derivative is NaN.
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


def value(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    if code == Act.IDENTITY:
        return z
    if code == Act.RELU:
        return F.relu(z)
    if code == Act.LEAKY_RELU:
        return F.leaky_relu(z, p0)
    if code == Act.SOFTPLUS:
        return F.softplus(z, p0, p1)
    if code == Act.SILU:
        return F.silu(z)
    if code == Act.GELU:
        return F.gelu(z)
    if code == Act.GELU_TANH:
        return F.gelu(z, approximate="tanh")
    if code == Act.TANH:
        return torch.tanh(z)
    if code == Act.SIGMOID:
        return torch.sigmoid(z)
    if code == Act.ELU:
        return F.elu(z, p0)
    if code == Act.SINE:
        return torch.sin(p0 * z)
    raise ValueError(f"unknown activation code {code}")


def derivative(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    """d value / d z, written with differentiable ops so autograd gives the second derivative."""
    if code == Act.IDENTITY:
        return torch.ones_like(z)
    if code == Act.RELU:  # the inner where passes a NaN z through
        return torch.where(z > 0, 1.0, torch.where(z <= 0, 0.0, z))
    if code == Act.LEAKY_RELU:
        return torch.where(z > 0, 1.0, torch.where(z <= 0, p0, z))
    if code == Act.SOFTPLUS:
        bz = z if p0 == 1.0 else z * p0
        return torch.where(bz > p1, 1.0, torch.sigmoid(bz))
    if code == Act.SILU:
        s = torch.sigmoid(z)
        return s * (1 + z * (1 - s))
    if code == Act.GELU:
        cdf = 0.5 * (1 + torch.erf(z * _INV_SQRT_2))
        pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
        return cdf + z * pdf
    if code == Act.GELU_TANH:
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z ** 3)
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
        t = torch.tanh(u)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * du
    if code == Act.TANH:
        t = torch.tanh(z)
        return 1 - t * t
    if code == Act.SIGMOID:
        s = torch.sigmoid(z)
        return s * (1 - s)
    if code == Act.ELU:
        return torch.where(z > 0, 1.0, p0 * torch.exp(z))
    if code == Act.SINE:
        return p0 * torch.cos(p0 * z)
    raise ValueError(f"unknown activation code {code}")


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


def second_derivative(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    """d² value / d z², used by the reverse pass through the tangents."""
    if code in (Act.IDENTITY, Act.RELU, Act.LEAKY_RELU):
        return torch.zeros_like(z)
    if code == Act.SOFTPLUS:
        bz = z if p0 == 1.0 else z * p0
        s = torch.sigmoid(bz)
        return torch.where(bz >= p1, 0.0, p0 * s * (1 - s))
    if code == Act.SILU:
        s = torch.sigmoid(z)
        return s * (1 - s) * (2 + z * (1 - 2 * s))
    if code == Act.GELU:
        pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
        return pdf * (2 - z * z)
    if code == Act.GELU_TANH:
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z ** 3)
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6 * _GELU_TANH_C * z
        t = torch.tanh(u)
        return (1 - t * t) * (du + 0.5 * z * (ddu - 2 * t * du * du))
    if code == Act.TANH:
        t = torch.tanh(z)
        return -2 * t * (1 - t * t)
    if code == Act.SIGMOID:
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 2 * s)
    if code == Act.ELU:
        return torch.where(z >= 0, 0.0, p0 * torch.exp(z))
    if code == Act.SINE:
        return -(p0 * p0) * torch.sin(p0 * z)
    raise ValueError(f"unknown activation code {code}")


def third_derivative(code: int, p0: float, p1: float, z: torch.Tensor) -> torch.Tensor:
    """d³ value / d z³, used by the reverse pass of the second-order pass (Laplacian, Hessian)."""
    if code in (Act.IDENTITY, Act.RELU, Act.LEAKY_RELU):
        return torch.zeros_like(z)
    if code == Act.SOFTPLUS:
        bz = z if p0 == 1.0 else z * p0
        s = torch.sigmoid(bz)
        return torch.where(bz >= p1, 0.0, (p0 * p0) * s * (1 - s) * (1 - 2 * s))
    if code == Act.SILU:
        s = torch.sigmoid(z)
        return s * (1 - s) * ((1 - 2 * s) * (3 + z * (1 - 2 * s)) - 2 * z * s * (1 - s))
    if code == Act.GELU:
        pdf = _INV_SQRT_2PI * torch.exp(-0.5 * z * z)
        return pdf * z * (z * z - 4)
    if code == Act.GELU_TANH:
        u = _SQRT_2_OVER_PI * (z + _GELU_TANH_C * z ** 3)
        du = _SQRT_2_OVER_PI * (1 + 3 * _GELU_TANH_C * z * z)
        ddu = _SQRT_2_OVER_PI * 6 * _GELU_TANH_C * z
        dddu = _SQRT_2_OVER_PI * 6 * _GELU_TANH_C
        t = torch.tanh(u)
        sech2 = 1 - t * t
        inner = du + 0.5 * z * (ddu - 2 * t * du * du)  # the second derivative is sech2 * inner
        d_inner = 1.5 * ddu - t * du * du + 0.5 * z * (dddu - 2 * sech2 * du ** 3 - 4 * t * du * ddu)
        return sech2 * (d_inner - 2 * t * du * inner)
    if code == Act.TANH:
        t = torch.tanh(z)
        return (1 - t * t) * (6 * t * t - 2)
    if code == Act.SIGMOID:
        s = torch.sigmoid(z)
        return s * (1 - s) * (1 - 6 * s + 6 * s * s)
    if code == Act.ELU:
        return torch.where(z >= 0, 0.0, p0 * torch.exp(z))
    if code == Act.SINE:
        return -(p0 ** 3) * torch.cos(p0 * z)
    raise ValueError(f"unknown activation code {code}")
