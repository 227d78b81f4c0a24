"""State: concurrent calls from several threads, and models mutated between calls (no stale caches)."""
import threading

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

import torchjac
from conftest import assert_close64, oracle_jacobian


def test_concurrent_calls_from_threads():
    """Eight threads, each with its own model and points, call every function at once, repeatedly."""
    torch.manual_seed(0)
    jobs = []
    for i in range(8):
        f = torchjac.PointMLP(3, [24, 24], 3, activation=["tanh", "softplus", "silu", "gelu"][i % 4],
                              cond_features=i % 2).double()
        x = torch.randn(300, 3, dtype=torch.float64)
        cond = torch.randn(300, 1, dtype=torch.float64) if i % 2 else None
        jac = oracle_jacobian(f, x, cond)[1]
        jobs.append((f, x, cond, jac))
    errors = []
    start = threading.Barrier(len(jobs))

    def run(f, x, cond, jac_ref):
        try:
            start.wait()
            for _ in range(5):
                assert_close64(torchjac.jacobian(f, x, cond=cond), jac_ref)
                assert_close64(torchjac.divergence(f, x, cond=cond), jac_ref.diagonal(0, -2, -1).sum(-1))
                assert_close64(torchjac.jvp(f, x, x, cond=cond), (jac_ref @ x.unsqueeze(-1)).squeeze(-1))
                x_req = x.clone().requires_grad_(True)
                torchjac.jacobian(f, x_req, cond=cond).sum().backward()
                x_ref = x.clone().requires_grad_(True)
                oracle_jacobian(f, x_ref, cond)[1].sum().backward()
                assert_close64(x_req.grad, x_ref.grad)
        except BaseException as e:  # collected: a failure in a thread must fail the test
            errors.append(e)

    threads = [threading.Thread(target=run, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]


def _check_current(f, x, cond=None):
    y_ref, jac_ref = oracle_jacobian(f, x, cond)
    y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)
    return jac


def test_in_place_weight_updates_are_seen():
    torch.manual_seed(0)
    f = torchjac.PointMLP(3, [16], 3, activation="tanh").double()
    x = torch.randn(10, 3, dtype=torch.float64)
    before = _check_current(f, x)
    with torch.no_grad():
        f.layers[0].weight.mul_(2)
        f.layers[1].bias.add_(1)
    after = _check_current(f, x)
    assert not torch.allclose(before, after)
    opt = torch.optim.SGD(f.parameters(), lr=0.5)  # an optimizer step is an in-place update too
    torchjac.divergence(f, x).sum().backward()
    opt.step()
    assert not torch.allclose(after, _check_current(f, x))


def test_swapped_layers_are_seen():
    torch.manual_seed(0)
    x = torch.randn(10, 3, dtype=torch.float64)
    seq = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    _check_current(seq, x)
    seq[1] = nn.Tanh()                              # another activation
    _check_current(seq, x)
    seq[2] = nn.Linear(8, 3).double()               # another Linear layer
    _check_current(seq, x)
    seq.append(nn.Sigmoid())                        # a layer added
    _check_current(seq, x)
    seq[1] = nn.Softplus(beta=2.0)
    _check_current(seq, x)
    seq[1].beta = 5.0                               # an activation parameter changed in place
    _check_current(seq, x)

    mlp = torchjac.PointMLP(3, [16], 3, activation="relu").double()
    _check_current(mlp, x)
    mlp.activation = nn.SiLU()
    _check_current(mlp, x)
    mlp.layers[0] = nn.Linear(3, 16).double()
    _check_current(mlp, x)


def test_parametrization_changes_are_seen():
    torch.manual_seed(0)
    f = torchjac.PointMLP(3, [16], 3, activation="softplus").double()
    x = torch.randn(10, 3, dtype=torch.float64)
    weight_norm(f.layers[0])
    before = _check_current(f, x)
    with torch.no_grad():
        f.layers[0].parametrizations.weight.original0.mul_(3)  # the norm g
    assert not torch.allclose(before, _check_current(f, x))


@pytest.mark.parametrize("change", ["weight", "activation"])
def test_compiled_calls_see_mutations(change):
    """A torch.compile'd loss reads the current parameters and recompiles when the model's structure changes."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3)).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    compiled = torch.compile(lambda x: torchjac.jacobian(seq, x), fullgraph=True)
    assert_close64(compiled(x), oracle_jacobian(seq, x)[1])
    if change == "weight":
        with torch.no_grad():
            seq[0].weight.mul_(-2)
    else:
        seq[1] = nn.SiLU()
    assert_close64(compiled(x), oracle_jacobian(seq, x)[1])
