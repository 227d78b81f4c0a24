"""torch.library.opcheck on every op: schema, fake tensors, autograd registration, AOT dispatch."""
import pytest
import torch

import torchjac  # noqa: F401
from torchjac.spec import lower


def sample_inputs(mode, lead=(2, 3), cond_lead=(2, 1), c=2, non_contiguous=False, requires_grad=True):
    d_out = 1 if mode in ("jacobian_reverse", "laplacian") else 3
    f = torchjac.PointMLP(3, [6, 5], d_out, activation="softplus", cond_features=c, skip_layers=(2,)).double()
    x = torch.randn(*lead, 3, dtype=torch.float64)
    if non_contiguous:
        x = torch.randn(*reversed(lead), 3, dtype=torch.float64).transpose(0, 1)
    cond = torch.randn(*cond_lead, c, dtype=torch.float64)
    spec = lower(f, x, c)
    weights = [w.detach().clone() for w in spec.weights]
    biases = [b.detach().clone() for b in spec.biases]
    extra = []
    if mode == "jvp":
        extra = [torch.randn(*lead, 2, 3, dtype=torch.float64)]
    elif mode in ("hutchinson", "laplacian_hutchinson"):
        extra = [torch.randint(0, 2, (*lead, 4, 3)).double() * 2 - 1]
    for t in [x, cond, *weights, *biases] + (extra if mode == "jvp" else []):
        t.requires_grad_(requires_grad)
    return (x, cond, weights, biases, spec.activations, spec.activation_params, spec.skip_layers, *extra)


CASES = {
    "default": {},
    "empty": {"lead": (0, 3), "cond_lead": (1, 1)},
    "non_contiguous": {"non_contiguous": True, "cond_lead": (1, 1)},
    "no_cond": {"c": 0, "cond_lead": (1, 1)},
    "no_grad": {"requires_grad": False},
}


ALL_MODES = ["jacobian", "divergence", "jvp", "hutchinson", "jacobian_reverse", "laplacian", "laplacian_hutchinson",
             "hessian"]
WITH_TANGENTS = ("jvp", "hutchinson", "laplacian_hutchinson")


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("mode", ALL_MODES)
def test_forward_op(mode, case):
    args = sample_inputs(mode, **CASES[case])
    torch.library.opcheck(getattr(torch.ops.torchjac, f"mlp_{mode}").default, args)


# Every mode on the default inputs; the layout cases on one mode of each direction and on jvp, whose
# backward has one output more (opcheck of a backward op runs double backward: the slowest check here).
BACKWARD_CASES = [(mode, "default") for mode in ALL_MODES]
BACKWARD_CASES += [(mode, case) for mode in ("jacobian", "jvp", "jacobian_reverse")
                   for case in ("empty", "non_contiguous")] + [("hessian", "empty")]


@pytest.mark.parametrize("mode,case", BACKWARD_CASES)
def test_backward_op(mode, case):
    args = sample_inputs(mode, **CASES[case])
    y, out, _ = getattr(torch.ops.torchjac, f"mlp_{mode}")(*args)
    grad_y = torch.randn_like(y).requires_grad_()
    grad_out = torch.randn_like(out).requires_grad_()
    torch.library.opcheck(getattr(torch.ops.torchjac, f"mlp_{mode}_backward").default, (grad_y, grad_out, *args))


@pytest.mark.parametrize("mode", ALL_MODES)
def test_reference_op(mode):
    args = list(sample_inputs(mode))
    tangents = args.pop() if mode in WITH_TANGENTS else None
    torch.library.opcheck(torch.ops.torchjac.mlp_reference_forward.default, (mode, *args, tangents))
    ours = torch.ops.torchjac.mlp_reference_forward(mode, *args, tangents)
    direct = getattr(torch.ops.torchjac, f"mlp_{mode}")(*args, *([tangents] if tangents is not None else []))
    for a, b in zip(ours, direct):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["jacobian", "jvp", "hutchinson", "jacobian_reverse", "hessian"])
def test_reference_backward_op(mode):
    args = list(sample_inputs(mode))
    tangents = args.pop() if mode in WITH_TANGENTS else None
    y, out, _ = torch.ops.torchjac.mlp_reference_forward(mode, *args, tangents)
    grad_y, grad_out = torch.randn_like(y).requires_grad_(), torch.randn_like(out).requires_grad_()
    torch.library.opcheck(torch.ops.torchjac.mlp_reference_backward.default,
                          (mode, grad_y, grad_out, *args, tangents))
    ours = torch.ops.torchjac.mlp_reference_backward(mode, grad_y, grad_out, *args, tangents)
    direct = getattr(torch.ops.torchjac, f"mlp_{mode}_backward")(
        grad_y, grad_out, *args, *([tangents] if tangents is not None else []))
    for a, b in zip(torch.utils._pytree.tree_leaves(ours[:4]), torch.utils._pytree.tree_leaves(direct[:4])):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["jacobian", "jacobian_reverse"])
def test_ops_keeping_states(mode):
    """keep_states=True: the fake kernel sizes states like the real one, and the backward op takes them."""
    args = sample_inputs(mode)
    torch.library.opcheck(getattr(torch.ops.torchjac, f"mlp_{mode}").default, (*args, True))
    y, out, states = getattr(torch.ops.torchjac, f"mlp_{mode}")(*args, True)
    # The reverse mode keeps each layer's z, and the cotangent row (d_out = 1) entering each layer after the first.
    assert states.numel() == (0 if mode == "jacobian" else 6 * (6 + 5 + 1) + 6 * (6 + 5))
    grad_y = torch.randn_like(y).requires_grad_()
    grad_out = torch.randn_like(out).requires_grad_()
    # Schema and fake kernel only: opcheck's autograd checks of a backward op run double backward, which
    # test_backward_op covers and which recomputes without the states.
    torch.library.opcheck(getattr(torch.ops.torchjac, f"mlp_{mode}_backward").default,
                          (grad_y, grad_out, *args, states), test_utils=("test_schema", "test_faketensor"))


def test_backward_op_rejects_states_of_the_wrong_size():
    args = sample_inputs("jacobian_reverse")
    y, out, states = torch.ops.torchjac.mlp_jacobian_reverse(*args, True)
    with pytest.raises(ValueError, match=r"mlp_jacobian_reverse_backward: states expected .* 138 elements"):
        torch.ops.torchjac.mlp_jacobian_reverse_backward(y, out, *args, states[:-1])
