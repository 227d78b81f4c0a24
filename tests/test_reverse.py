"""Reverse mode (d_out < d_in: SDFs, energies) and the CPU path's chunk runner, against torch.func and autograd."""
import pytest
import torch
from torch import nn
from torch.func import jacrev, vmap

import torchjac
from torchjac import _C, kernels
from conftest import ACTIVATIONS, assert_close64, autograd_jacobian
from ops_seen import ops_seen


def sdf(activation=nn.Softplus(beta=100), width=32, depth=3, d_in=3, d_out=1):
    """An SDF as its papers write it: a Sequential of Linear layers and one activation module."""
    torch.manual_seed(0)
    layers, n = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(n, width), activation]
        n = width
    return nn.Sequential(*layers, nn.Linear(n, d_out)).double()


def create_graph_eikonal(f, x):
    """The eikonal loss as users write it: autograd.grad with create_graph."""
    x = x.detach().requires_grad_()
    y = f(x)
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return ((grad.norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()


def torchjac_eikonal(f, x):
    y, jac = torchjac.jacobian(f, x, return_output=True)
    return ((jac.squeeze(-2).norm(dim=-1) - 1) ** 2).mean() + y.abs().mean()


def param_grads(loss_fn, f, x):
    f.zero_grad()
    loss_fn(f, x).backward()
    return [p.grad.clone() for p in f.parameters()]


@pytest.fixture
def many_chunks(monkeypatch):
    """Chunks of 16 points, so that a few hundred points make many chunks across the workers."""
    monkeypatch.setattr(kernels, "CHUNK_BYTES", 1)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
@pytest.mark.parametrize("d_out", [1, 2])
def test_reverse_jacobian_equals_vmap_jacrev(name, d_out, many_chunks):
    f = torchjac.PointMLP(3, [9, 7, 5], d_out, activation=ACTIVATIONS[name], cond_features=2,
                          skip_layers=(2,)).double()
    x = torch.randn(4, 50, 3, dtype=torch.float64)
    cond = torch.randn(4, 1, 2, dtype=torch.float64)  # one code per shape, shared by chunks on both workers
    with ops_seen() as seen:
        y, jac = torchjac.jacobian(f, x, cond=cond, return_output=True)
    assert "torchjac.mlp_jacobian_reverse" in seen and "torchjac.mlp_jacobian" not in seen
    expected = vmap(vmap(jacrev(f), (0, None)), (0, 0))(x, cond.squeeze(1))
    assert_close64(jac, expected)
    assert_close64(y, f(x, cond.expand(4, 50, 2)))


def test_square_and_wide_outputs_take_forward_mode():
    for d_out in (3, 5):
        f = torchjac.PointMLP(3, [8], d_out).double()
        with ops_seen() as seen:
            torchjac.jacobian(f, torch.randn(10, 3, dtype=torch.float64))
        assert "torchjac.mlp_jacobian" in seen and "torchjac.mlp_jacobian_reverse" not in seen


def test_explain_names_the_direction():
    assert "reverse mode (d_in=3, d_out=1)" in str(torchjac.explain(sdf()))
    assert "forward mode (d_in=3, d_out=3)" in str(torchjac.explain(torchjac.PointMLP(3, [8], 3)))


@pytest.mark.parametrize("activation", [nn.Softplus(beta=100), nn.Tanh(), torchjac.Sine(30.0), nn.ReLU()])
def test_eikonal_training_gradients_equal_create_graph(activation, many_chunks):
    f = sdf(activation)
    x = torch.rand(300, 3, dtype=torch.float64) * 2 - 1
    expected = param_grads(create_graph_eikonal, f, x)
    for ours, theirs in zip(param_grads(torchjac_eikonal, f, x), expected):
        assert_close64(ours, theirs)


@pytest.mark.parametrize("name", ["softplus", "tanh", "relu", "sine"])
def test_backward_from_kept_states_equals_recomputing(name, many_chunks):
    """The reverse op's backward from the forward's kept pre-activations equals its backward from scratch."""
    f = torchjac.PointMLP(3, [9, 7, 5], 2, activation=ACTIVATIONS[name], cond_features=2, skip_layers=(2,)).double()
    x = torch.randn(3, 40, 3, dtype=torch.float64)
    cond = torch.randn(3, 1, 2, dtype=torch.float64)
    spec = torchjac.spec.lower(f, x, 2)
    args = (x, cond, *spec.op_args())
    y, jac, states = torch.ops.torchjac.mlp_jacobian_reverse(*args, True)
    assert states.numel() == 120 * (9 + 7 + 5 + 2) + 2 * 120 * (9 + 7 + 5)  # z per layer, 2 cotangent rows
    grad_y, grad_jac = torch.randn_like(y), torch.randn_like(jac)
    from_states = torch.ops.torchjac.mlp_jacobian_reverse_backward(grad_y, grad_jac, *args, states)
    recomputed = torch.ops.torchjac.mlp_jacobian_reverse_backward(grad_y, grad_jac, *args)
    flat = lambda g: [g[0], g[1], *g[2], *g[3]]
    for a, b in zip(flat(from_states), flat(recomputed)):
        assert_close64(a, b)


def test_training_keeps_states_and_inference_does_not(monkeypatch):
    f = sdf()
    x = torch.randn(64, 3, dtype=torch.float64)
    kept = []
    original = kernels.forward

    def spy(mode, *args, keep_states=False, **kwargs):
        kept.append(keep_states)
        return original(mode, *args, keep_states=keep_states, **kwargs)

    monkeypatch.setattr(kernels, "forward", spy)
    with torch.no_grad():
        torchjac.jacobian(f, x)
    torchjac.jacobian(f, x)  # the parameters require grad
    assert kept == [False, True]


def test_gradient_reaches_x_and_cond_through_reverse_mode(many_chunks):
    f = torchjac.PointMLP(3, [16, 16], 1, activation=nn.Softplus(beta=100), cond_features=4,
                          skip_layers=(1,)).double()
    x = torch.randn(2, 100, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(2, 1, 4, dtype=torch.float64, requires_grad=True)  # a latent code per shape
    jac = torchjac.jacobian(f, x, cond=cond)
    ours = torch.autograd.grad((jac ** 2).sum(), (x, cond))
    y = f(x, cond.expand(2, 100, 4))
    (grad,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    theirs = torch.autograd.grad((grad ** 2).sum(), (x, cond))
    for a, b in zip(ours, theirs):
        assert_close64(a, b)


def test_reverse_mode_float32_is_within_float32_tolerance():
    f = sdf(width=64)
    x = torch.rand(2000, 3, dtype=torch.float64) * 2 - 1
    expected = vmap(jacrev(f))(x)
    jac = torchjac.jacobian(f.float(), x.float())
    err = ((jac.double() - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-5


def test_non_finite_point_gives_nan_jacobian_in_reverse_mode():
    f = sdf(nn.Tanh())
    x = torch.randn(5, 3, dtype=torch.float64)
    x[2, 1] = float("inf")
    jac = torchjac.jacobian(f, x)
    assert torch.isnan(jac[2]).all()
    assert_close64(jac[[0, 1, 3, 4]], vmap(jacrev(f))(x[[0, 1, 3, 4]]))


def test_compiled_eikonal_step_equals_eager():
    f = sdf(width=16)
    x = torch.rand(64, 3, dtype=torch.float64)
    eager = param_grads(torchjac_eikonal, f, x)
    compiled = param_grads(torch.compile(torchjac_eikonal, fullgraph=True, backend="aot_eager"), f, x)
    for a, b in zip(compiled, eager):
        assert_close64(a, b)


def test_double_backward_through_reverse_mode_equals_autograd():
    f = sdf(nn.Tanh(), width=8)
    x = torch.randn(20, 3, dtype=torch.float64, requires_grad=True)
    w = f[0].weight

    def loss_grad(jacobian):
        (g_w,) = torch.autograd.grad((jacobian(x) ** 2).sum(), w, create_graph=True)
        return torch.autograd.grad((g_w ** 2).sum(), x)[0]

    def autograd_jac(x):
        (g,) = torch.autograd.grad(f(x).sum(), x, create_graph=True)
        return g

    assert_close64(loss_grad(lambda x: torchjac.jacobian(f, x)), loss_grad(autograd_jac))


# ---- the chunk runner of the CPU path (csrc/python/module.cpp)

def test_parallel_chunks_calls_each_chunk_once_with_a_valid_worker():
    calls = []
    _C.parallel_chunks(lambda i, worker: calls.append((i, worker)), 1000)
    assert sorted(i for i, _ in calls) == list(range(1000))
    assert all(0 <= w < _C.max_workers() for _, w in calls)


def test_parallel_chunks_raises_the_first_error_of_a_chunk():
    def chunk(i, worker):
        if i == 7:
            raise KeyError("chunk 7")

    with pytest.raises(KeyError, match="chunk 7"):
        _C.parallel_chunks(chunk, 100)


def test_parallel_chunks_runs_on_several_workers():
    if _C.max_workers() < 2:
        pytest.skip("one intra-op thread")
    import time
    workers = set()

    def chunk(i, worker):
        time.sleep(0.001)  # releases the GIL, as every torch op does
        workers.add(worker)

    _C.parallel_chunks(chunk, 200)
    assert len(workers) > 1


@pytest.mark.parametrize("mode", ["jacobian", "divergence", "jvp", "hutchinson"])
@pytest.mark.parametrize("cond_lead", [(4, 60), (4, 1)], ids=["per_point_cond", "shared_cond"])
def test_forward_modes_train_the_same_over_many_chunks(mode, cond_lead, many_chunks):
    """The backward of every forward-mode op, its chunks spread over the workers, against create_graph autograd."""
    torch.manual_seed(0)
    f = torchjac.PointMLP(3, [12, 10], 3, activation="tanh", cond_features=2, skip_layers=(1,)).double()
    x = torch.randn(4, 60, 3, dtype=torch.float64, requires_grad=True)
    cond = torch.randn(*cond_lead, 2, dtype=torch.float64, requires_grad=True)
    v = torch.randn(4, 60, 3, dtype=torch.float64, requires_grad=True)
    noise = torch.randint(0, 2, (2, 4, 60, 3)).double() * 2 - 1
    leaves = [x, cond, v, *f.parameters()] if mode == "jvp" else [x, cond, *f.parameters()]

    def loss(y, out):
        return (y ** 2).sum() + (out ** 2).sum()

    def from_jacobian(y, jac):
        if mode == "jacobian":
            return loss(y, jac)
        if mode == "divergence":
            return loss(y, jac.diagonal(0, -2, -1).sum(-1))
        if mode == "jvp":
            return loss(y, (jac @ v.unsqueeze(-1)).squeeze(-1))
        return loss(y, torch.einsum("s...i,...ij,s...j->...", noise, jac, noise) / noise.shape[0])

    if mode == "jacobian":
        ours = loss(*torchjac.jacobian(f, x, cond=cond, return_output=True))
    elif mode == "jvp":
        ours = loss(*torchjac.jvp(f, x, v, cond=cond, return_output=True))
    else:
        estimator = "hutchinson" if mode == "hutchinson" else "exact"
        ours = loss(*torchjac.divergence(f, x, cond=cond, estimator=estimator, return_output=True,
                                         **({"noise": noise} if mode == "hutchinson" else {})))
    theirs = from_jacobian(*autograd_jacobian(f, x, cond))
    for a, b in zip(torch.autograd.grad(ours, leaves), torch.autograd.grad(theirs, leaves)):
        assert_close64(a, b)


def test_parallel_chunks_keeps_the_callers_grad_mode():
    modes = set()
    with torch.no_grad():
        _C.parallel_chunks(lambda i, worker: modes.add(torch.is_grad_enabled()), 50)
    assert modes == {False}


def test_saturated_softplus_in_float32_stays_accurate_and_the_caller_keeps_subnormals():
    """The workers flush subnormals; the results stay within float32 tolerance, the caller's thread does not flush."""
    f = sdf(width=64)
    x = torch.rand(4000, 3, dtype=torch.float64) * 2 - 1  # Softplus(100) saturates: subnormal slopes
    expected = param_grads(create_graph_eikonal, f, x)
    f32 = sdf(width=64).float()
    ours = param_grads(torchjac_eikonal, f32, x.float())
    for a, b in zip(ours, expected):
        assert ((a.double() - b).abs().max() / b.abs().max()).item() < 1e-4
    tiny = torch.tensor([1e-40], dtype=torch.float32)
    assert (tiny * 1.0).item() > 0


def test_parallel_chunks_static_schedule_gives_each_worker_fixed_chunks():
    calls = []
    _C.parallel_chunks(lambda i, worker: calls.append((i, worker)), 101, False)
    assert sorted(i for i, _ in calls) == list(range(101))
    workers = _C.max_workers()
    for worker in {w for _, w in calls}:
        assert [i for i, w in calls if w == worker] == list(range(worker, 101, workers))


def test_deterministic_algorithms_give_bitwise_equal_gradients(many_chunks):
    f = sdf(width=32).float()
    x = torch.randn(3000, 3)
    torch.use_deterministic_algorithms(True)
    try:
        first, second = (param_grads(torchjac_eikonal, f, x) for _ in range(2))
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_explain_does_not_guess_d_in_when_cond_shares_the_first_layer():
    class Dynamics(nn.Module):  # a CNF's: x (3) and the time t (1) into one Linear
        def __init__(self):
            super().__init__()
            self.l0, self.l1 = nn.Linear(4, 16), nn.Linear(16, 3)

        def forward(self, x, t):
            return self.l1(torch.tanh(self.l0(torch.cat([x, t], -1))))

    detail = torchjac.explain(Dynamics(), cond=True).detail
    assert "forward mode, or in reverse mode if d_out=3 < d_in" in detail
    assert "d_in=4" not in detail


def test_chunks_are_cut_for_every_worker(monkeypatch):
    class ManyWorkers:
        @staticmethod
        def max_workers():
            return 32

    weights = [torch.zeros(256, 3), torch.zeros(1, 256)]
    x = torch.zeros(4096, 3)
    cache_sized = kernels.rows_per_chunk("jacobian_reverse", x, weights, None)
    monkeypatch.setattr(kernels, "_C", ManyWorkers)
    assert kernels.rows_per_chunk("jacobian_reverse", x, weights, None) == 4096 // 32 < cache_sized
    small = torch.zeros(cache_sized, 3)  # one chunk: run whole, multi-threaded ops
    assert kernels.rows_per_chunk("jacobian_reverse", small, weights, None) == cache_sized


def test_reference_backward_refuses_kept_states_under_autograd():
    """Kept z would be constants to autograd (double backward), silently dropping their dependence on x and W."""
    from torchjac import reference
    x, cond = torch.randn(4, 3, dtype=torch.float64), torch.zeros(4, 0, dtype=torch.float64)
    w, b = [torch.randn(5, 3, dtype=torch.float64), torch.randn(1, 5, dtype=torch.float64)], \
        [torch.zeros(5, dtype=torch.float64), torch.zeros(1, dtype=torch.float64)]
    kept = [torch.zeros(1, 4, 5, dtype=torch.float64), torch.zeros(1, 4, 1, dtype=torch.float64)]
    with pytest.raises(ValueError, match="differentiable=True pass kept=None"):
        reference.backward("jacobian_reverse", torch.ones(4, 1, dtype=torch.float64),
                           torch.ones(4, 1, 3, dtype=torch.float64), x, cond, w, b, [7, 0], [0.0] * 4, [],
                           kept=kept)
