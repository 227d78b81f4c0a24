"""torchjac: per-point Jacobians, divergences, JVPs, Laplacians and Hessians of point-wise MLPs."""
from . import ops  # noqa: F401  (registers the ops)
from .activations import Sine
from .api import divergence, explain, hessian, jacobian, jvp, laplacian
from .mlp import PointMLP

__all__ = ["jacobian", "divergence", "jvp", "laplacian", "hessian", "explain", "PointMLP", "Sine"]
__version__ = "0.1.0"
