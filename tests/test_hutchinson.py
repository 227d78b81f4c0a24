"""Hutchinson divergence: reproducibility, noise laws and convergence to the exact trace."""
import math

import pytest
import torch

import torchjac
from conftest import assert_close64, oracle_jacobian, replay_noise


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
    e = replay_noise(noise, (4, 5, 3, 3), seed=3)
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


def _eTJe(e, jac):
    """mean_s e_s^T J e_s for noise (S, ..., d) and J (..., d, d)."""
    return torch.einsum("s...i,...ij,s...j->s...", e, jac, e).mean(0)


@pytest.mark.parametrize("path", ["fused", "generic"])
@pytest.mark.parametrize("samples", [None, 1, 4])
def test_given_noise_tensor(path, samples):
    """A noise tensor (x.shape or (S, *x.shape)) is used as given, on the fused and the generic path."""
    mlp = _model()
    f = mlp if path == "fused" else (lambda p: torch.sin(mlp(p)))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    e = torch.randn((samples or 1, 2, 5, 3), dtype=torch.float64)
    noise = e[0] if samples is None else e
    est = torchjac.divergence(f, x, estimator="hutchinson", noise=noise)
    _, jac = oracle_jacobian(f, x)
    assert_close64(est, _eTJe(e, jac))


def test_given_noise_with_broadcast_cond_and_conv1d_layout():
    f = torchjac.PointMLP(3, [16], 3, activation="silu", cond_features=2).double()
    x, cond = torch.randn(1, 6, 3, dtype=torch.float64), torch.randn(4, 1, 2, dtype=torch.float64)
    e = torch.randn(3, 1, 6, 3, dtype=torch.float64)  # x's shape: shared by the 4 cond rows
    _, jac = oracle_jacobian(f, x, cond)
    est = torchjac.divergence(f, x, cond=cond, estimator="hutchinson", noise=e)
    assert est.shape == (4, 6)
    assert_close64(est, _eTJe(e.expand(3, 4, 6, 3), jac))

    conv = torch.nn.Sequential(torch.nn.Conv1d(3, 8, 1), torch.nn.Tanh(), torch.nn.Conv1d(8, 3, 1)).double()
    xc = torch.randn(2, 3, 7, dtype=torch.float64)      # (B, C, N)
    ec = torch.randn(5, 2, 3, 7, dtype=torch.float64)   # (S, B, C, N)
    _, jac_c = oracle_jacobian(lambda p: conv(p.movedim(-1, -2)).movedim(-2, -1), xc.movedim(-2, -1))
    est_c = torchjac.divergence(conv, xc, estimator="hutchinson", noise=ec)
    assert_close64(est_c, _eTJe(ec.movedim(-2, -1), jac_c))


def test_given_noise_errors():
    f, x = _model(), torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"noise expected shape \(4, 3\) \(x's\) or \('num_samples', 4, 3\), got \(4, 2\)"):
        torchjac.divergence(f, x, estimator="hutchinson", noise=torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="noise expected dtype torch.float64 on cpu like x"):
        torchjac.divergence(f, x, estimator="hutchinson", noise=torch.randn(4, 3))
    with pytest.raises(ValueError, match="its first dim is the number of samples"):
        torchjac.divergence(f, x, estimator="hutchinson", noise=torch.randn(4, 3, dtype=torch.float64),
                            num_samples=2)
    with pytest.raises(ValueError, match="only used with estimator=\"hutchinson\""):
        torchjac.divergence(f, x, noise=torch.randn(4, 3, dtype=torch.float64))
