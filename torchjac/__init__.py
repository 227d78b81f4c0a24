"""torchjac: per-point Jacobians, divergences and JVPs of point-wise MLPs."""
from . import ops  # noqa: F401  (registers the ops)
from .activations import Sine
from .api import divergence, explain, jacobian, jvp
from .mlp import PointMLP

__all__ = ["jacobian", "divergence", "jvp", "explain", "PointMLP", "Sine"]
__version__ = "0.1.0"
