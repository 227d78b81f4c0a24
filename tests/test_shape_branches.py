"""Forwards that branch on their input's shape (DeepSDF), unpack it (``latent.expand(*x.shape[:-1], n)``), or
hold unused nodes and dropout: fused where that is exact at every number of points, the generic path otherwise,
against the torch.func oracle."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torchjac
import zoo
from conftest import assert_close64, autograd_jacobian, oracle_jacobian
from ops_seen import ops_seen

FUSED_OPS = {"torchjac.mlp_jacobian", "torchjac.mlp_jacobian_reverse"}


class WidthBranch(nn.Module):
    """Takes one of two layers by the width of its input, as DeepSDF does: constant for a given width."""

    def __init__(self):
        super().__init__()
        self.narrow, self.wide, self.out = nn.Linear(3, 16), nn.Linear(5, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = self.wide(x) if x.shape[-1] > 3 else self.narrow(x)
        return self.out(torch.tanh(h))


class PointCountBranch(nn.Module):
    """Branches on the number of points: not one function of each point."""

    def __init__(self, threshold=6):
        super().__init__()
        self.threshold = threshold
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) if x.shape[0] > self.threshold else self.b(x)


class ValueBranch(nn.Module):
    """Branches on the values of x."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) if x.sum() > 0 else self.b(x)


class Unpacked(nn.Module):
    """Broadcasts a shared code with the shape of x unpacked, and keeps a slice of the input it never uses."""

    def __init__(self):
        super().__init__()
        self.l0, self.l1 = nn.Linear(3 + 4, 16), nn.Linear(16, 3)

    def forward(self, x, code):
        unused = x[..., :1]  # computes nothing the output reads
        code = code.expand(*x.shape[:-1], code.shape[-1])
        return self.l1(F.softplus(self.l0(torch.cat([x, code], -1)), beta=10))


class ChangedInPlace(nn.Module):
    """Changes a layer's output in place, with h.mul_ ("method") or torch.mul(..., out=h) ("out"), the call's own
    result unused: never skipped as dead."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        self.l0, self.l1 = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.l0(x)
        if self.how == "method":
            h.mul_(2.0)
        else:
            torch.mul(h, 2.0, out=h)
        return self.l1(torch.tanh(h))


class Dropped(nn.Module):
    def __init__(self, functional: bool):
        super().__init__()
        self.functional = functional
        self.l0, self.l1 = nn.Linear(3, 16), nn.Linear(16, 1)
        if not functional:
            self.drop = nn.Dropout(0.3)

    def forward(self, x):
        h = torch.relu(self.l0(x))
        h = F.dropout(h, p=0.3, training=self.training) if self.functional else self.drop(h)
        return self.l1(h)


def _points(*shape):
    torch.manual_seed(1)
    return torch.randn(*shape, dtype=torch.float64)


def _runs_fused(f, x, cond=None):
    with ops_seen() as seen, torch.no_grad():
        torchjac.jacobian(f, x, cond=cond)
    return bool(seen & FUSED_OPS)


def _assert_fused_and_exact(f, x):
    assert torchjac.explain(f, x).path == "fused"
    assert _runs_fused(f, x)
    y_ref, jac_ref = oracle_jacobian(f, x)
    y, jac = torchjac.jacobian(f, x, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)


@pytest.mark.parametrize("width", [3, 5])
def test_a_branch_on_the_input_width_is_fused_for_that_width(width):
    torch.manual_seed(0)
    f = WidthBranch().double()
    x = _points(11, width)
    _assert_fused_and_exact(f, x)


def test_explain_without_an_example_asks_for_one():
    why = torchjac.explain(WidthBranch())
    assert why.path == "generic"
    assert "explain(f, x) with an example input" in why.detail and "'gt'" in why.detail


@pytest.mark.parametrize("model, words", [(PointCountBranch, "depends on the number of points"),
                                          (ValueBranch, "not computed from shapes alone")])
def test_a_branch_on_the_points_or_their_values_takes_the_generic_path(model, words):
    torch.manual_seed(0)
    f = model().double()
    for n in (4, 9):  # both sides of the point-count branch
        x = (_points(n, 3) + (1.0 if n == 4 else -1.0)).requires_grad_()  # both sides of the value branch
        why = torchjac.explain(f, x)
        assert why.path == "generic" and words in why.detail, why
        assert not _runs_fused(f, x)
        # f is no function of each point alone: its J is the batch's, from the autograd loop on the whole of x
        assert_close64(torchjac.jacobian(f, x), autograd_jacobian(f, x)[1])


@pytest.mark.parametrize("code_shape", [(4,), (1, 4), (2, 1, 4)])
def test_a_code_expanded_with_the_unpacked_shape_is_fused(code_shape):
    torch.manual_seed(0)
    f = Unpacked().double()
    x = _points(2, 5, 3)
    code = torch.randn(code_shape, dtype=torch.float64)
    assert torchjac.explain(f, x, cond=code).path == "fused"
    assert _runs_fused(f, x, code)
    assert_close64(torchjac.jacobian(f, x, cond=code), oracle_jacobian(f, x, code.expand(2, 5, 4))[1])


def test_a_branch_on_a_point_count_no_sample_separates_is_told_by_the_call():
    """Above the two sampled point counts (5 and 7) both take one side; a call of 200 points takes the other."""
    torch.manual_seed(0)
    f = PointCountBranch(threshold=100).double()
    x = _points(200, 3).requires_grad_()
    why = torchjac.explain(f, x)
    assert why.path == "generic" and "depends on the number of points" in why.detail, why
    assert not _runs_fused(f, x)
    assert_close64(torchjac.jacobian(f, x), autograd_jacobian(f, x)[1])


@pytest.mark.parametrize("how, node", [("method", "mul_"), ("out", "mul")])
def test_an_in_place_change_is_not_skipped_as_unused(how, node):
    torch.manual_seed(0)
    f = ChangedInPlace(how).double()
    x = _points(7, 3)
    why = torchjac.explain(f, x)
    assert why.path == "generic" and f"node {node!r}" in why.detail, why
    if how == "method":  # autograd refuses out= on tensors that require grad, the oracle too
        assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])


@pytest.mark.parametrize("functional", [True, False])
def test_dropout_is_fused_in_eval_mode_and_left_to_the_generic_path_in_training(functional):
    torch.manual_seed(0)
    f = Dropped(functional).double().eval()
    x = _points(9, 3)
    assert torchjac.explain(f, x).path == "fused"
    assert_close64(torchjac.jacobian(f, x), oracle_jacobian(f, x)[1])
    f.train()
    why = torchjac.explain(f, x)
    if functional:  # one mask per call, which the generic path's one forward uses
        assert why.path == "generic", why
        assert "dropout in training mode (p=0.3)" in why.detail and "model.eval()" in why.detail, why
        assert not _runs_fused(f, x)
    else:
        assert why.path == "refused" and "dropout in training mode" in why.detail, why


def _deepsdf(**kw):
    torch.manual_seed(0)
    decoder = zoo.DeepSDFDecoder(**kw).double().eval()  # eval: dropout is the identity
    with torch.no_grad():
        for p in decoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return decoder


def test_deepsdf_decoder_called_on_its_concatenated_input():
    """The decoder as DeepSDF's code calls it, on cat([latent, xyz]) per point; J w.r.t. all 11 inputs."""
    decoder = _deepsdf()
    x = _points(13, 11)
    _assert_fused_and_exact(decoder, x)


@pytest.mark.parametrize("kw", [dict(latent_dropout=True), dict(weight_norm=False, norm_layers=()),
                                dict(latent_in=(1, 3), dropout=None), dict(use_tanh=True)])
def test_deepsdf_decoder_variants_with_the_latent_as_cond(kw):
    """Its options: latent dropout (slices of cat([latent, xyz])), no weight norm, other skips; a tanh after the
    last layer as well as the final one (use_tanh) is two activations in a row, left to the generic path."""
    m = zoo.LatentSDF(_deepsdf(**kw))
    x, latent = _points(13, 3), torch.randn(1, 8, dtype=torch.float64)
    why = torchjac.explain(m, x, cond=latent)
    if kw.get("use_tanh"):
        assert why.path == "generic" and "an activation must directly follow a Linear layer" in why.detail, why
    else:
        assert why.path == "fused", why
        assert _runs_fused(m, x, latent)
    y_ref, jac_ref = oracle_jacobian(m, x, latent.expand(13, 8))
    y, jac = torchjac.jacobian(m, x, cond=latent, return_output=True)
    assert_close64(jac, jac_ref)
    assert_close64(y, y_ref)


def test_slices_of_the_input_that_split_a_block_are_refused_by_name():
    """DeepSDF's latent dropout on the decoder alone slices x itself: not whole blocks."""
    why = torchjac.explain(_deepsdf(latent_dropout=True), _points(13, 11))
    assert why.path == "generic" and "not parts of one" in why.detail, why
