"""Hutchinson divergence: reproducibility, noise laws and convergence to the exact trace."""
import math

import pytest
import torch

import torchjac
from conftest import assert_close64, oracle_jacobian


def _model():
    torch.manual_seed(0)
    return torchjac.PointMLP(3, [32, 32], 3, activation="tanh").double()


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_reproducible_with_generator(noise):
    f, x = _model(), torch.randn(10, 3, dtype=torch.float64)
    a = torchjac.divergence(f, x, estimator="hutchinson", noise=noise, generator=torch.Generator().manual_seed(7))
    b = torchjac.divergence(f, x, estimator="hutchinson", noise=noise, generator=torch.Generator().manual_seed(7))
    c = torchjac.divergence(f, x, estimator="hutchinson", noise=noise, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_single_sample_equals_eTJe_of_the_drawn_noise(noise):
    """With the generator's noise replayed, the estimate is exactly e^T J e averaged over samples."""
    f, x = _model(), torch.randn(4, 5, 3, dtype=torch.float64)
    est = torchjac.divergence(f, x, estimator="hutchinson", num_samples=3, noise=noise,
                              generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    if noise == "rademacher":
        e = torch.randint(0, 2, (4, 5, 3, 3), generator=g, dtype=torch.float64) * 2 - 1
    else:
        e = torch.randn((4, 5, 3, 3), generator=g, dtype=torch.float64)
    _, jac = oracle_jacobian(f, x)
    expected = torch.einsum("...si,...ij,...sj->...s", e, jac, e).mean(-1)
    assert_close64(est, expected)


@pytest.mark.parametrize("noise", ["rademacher", "gaussian"])
def test_mean_converges_to_trace_within_statistical_bound(noise):
    """The mean of S samples lies within 5 standard errors of the exact trace at every point.

    For Rademacher noise Var(e^T J e) = sum_{i != j} (J_ij^2 + J_ij J_ji); for Gaussian noise it is
    ||J + J^T||_F^2 / 2. With 12 points the chance that any one falls outside 5 sigma is below 1e-5.
    """
    f, x = _model(), torch.randn(12, 3, dtype=torch.float64)
    samples = 20000
    est = torchjac.divergence(f, x, estimator="hutchinson", num_samples=samples, noise=noise,
                              generator=torch.Generator().manual_seed(11))
    _, jac = oracle_jacobian(f, x)
    trace = jac.diagonal(0, -2, -1).sum(-1)
    sym = jac + jac.transpose(-1, -2)
    if noise == "rademacher":
        off = sym - torch.diag_embed(sym.diagonal(0, -2, -1))
        var = (off ** 2).sum((-2, -1)) / 2
    else:
        var = (sym ** 2).sum((-2, -1)) / 2
    stderr = (var / samples).sqrt()
    assert torch.all((est - trace).abs() <= 5 * stderr + 1e-12), ((est - trace) / stderr)
    assert torch.all(stderr > 0)
