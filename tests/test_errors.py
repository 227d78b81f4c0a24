"""Bad input gets an error naming the argument or module and what was expected."""
import pytest
import torch
from torch import nn

import torchjac


def mlp(**kw):
    return torchjac.PointMLP(3, [8], 3, **kw)


def test_wrong_d_in():
    with pytest.raises(ValueError, match=r"x expected last dim 3.*got shape \(4, 5\)"):
        torchjac.jacobian(mlp(), torch.randn(4, 5))
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"'0' \(Linear\): expected 5 input features .* got 3"):
        torchjac.jacobian(seq, torch.randn(4, 5))


def test_dtype_mismatch():
    with pytest.raises(ValueError, match="x has dtype torch.float64.*parameters have dtype torch.float32"):
        torchjac.jacobian(mlp(), torch.randn(4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="cond expected dtype torch.float32"):
        torchjac.jacobian(mlp(cond_features=2), torch.randn(4, 3), cond=torch.randn(4, 2, dtype=torch.float64))
    with pytest.raises(TypeError, match="x expected a floating-point tensor, got dtype torch.int64"):
        torchjac.jacobian(mlp(), torch.ones(4, 3, dtype=torch.long))


def test_half_precision_on_the_pure_pytorch_path_is_refused():
    f = mlp().half()
    with pytest.raises(TypeError, match="supports float32 and float64, got x of dtype torch.float16"):
        torchjac.jacobian(f, torch.randn(4, 3).half())


def test_device_mismatch():
    with pytest.raises(ValueError, match="x has dtype torch.float32 on meta, but f's parameters .* on cpu"):
        torchjac.jacobian(mlp(), torch.randn(4, 3, device="meta"))
    with pytest.raises(ValueError, match="v expected dtype torch.float32 on cpu like x"):
        torchjac.jvp(mlp(), torch.randn(4, 3), torch.randn(4, 3, device="meta"))


def test_divergence_needs_square_jacobian():
    f = torchjac.PointMLP(3, [8], 2)
    with pytest.raises(ValueError, match="f maps 3 -> 2"):
        torchjac.divergence(f, torch.randn(4, 3))
    with pytest.raises(ValueError, match="f maps 3 -> 2"):
        torchjac.divergence(f, torch.randn(4, 3), estimator="hutchinson")


def test_divergence_options():
    f, x = mlp(), torch.randn(4, 3)
    with pytest.raises(ValueError, match="estimator expected one of"):
        torchjac.divergence(f, x, estimator="hutch")
    with pytest.raises(ValueError, match="noise expected one of"):
        torchjac.divergence(f, x, estimator="hutchinson", noise="uniform")
    with pytest.raises(ValueError, match="num_samples expected a positive int, got 0"):
        torchjac.divergence(f, x, estimator="hutchinson", num_samples=0)
    with pytest.raises(TypeError, match="generator expected a torch.Generator"):
        torchjac.divergence(f, x, estimator="hutchinson", generator=3)


def test_f_must_be_callable():
    with pytest.raises(TypeError, match="f expected a callable .* got int"):
        torchjac.jacobian(3, torch.randn(4, 3))


def test_unsupported_layer_in_a_conv1d_stack():
    """Channels-first stacks have no generic fallback: their layout is not (..., features)."""
    seq = nn.Sequential(nn.Conv1d(3, 8, 1), nn.LayerNorm(5), nn.Conv1d(8, 3, 1))
    with pytest.raises(ValueError, match=r"layer '1' \(LayerNorm\) is not supported by the fused MLP path"):
        torchjac.jacobian(seq, torch.randn(2, 3, 5))
    seq = nn.Sequential(nn.Conv1d(3, 8, 1), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"nn.Linear acts on the points dim"):
        torchjac.jacobian(seq, torch.randn(2, 3, 8))


def test_layers_that_couple_points_are_refused():
    seq = nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"'1' \(BatchNorm1d\): BatchNorm in training mode .* not independent"):
        torchjac.jacobian(seq, torch.randn(4, 3))
    seq.eval()
    with pytest.raises(ValueError, match="normalizes dim 1, which holds points"):
        torchjac.jacobian(seq, torch.randn(2, 4, 3))
    drop = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.1), nn.Linear(8, 3))
    with pytest.raises(ValueError, match=r"'1' \(Dropout\): dropout in training mode"):
        torchjac.jacobian(drop, torch.randn(4, 3))
    for mixer in (nn.Conv1d(3, 3, 3, padding=1), nn.MaxPool1d(2), nn.InstanceNorm1d(3),
                  nn.MultiheadAttention(3, 1), nn.Dropout1d(0.5)):
        with pytest.raises(ValueError, match=f"torchjac.divergence: f \\({type(mixer).__name__}\\): it|"
                                             f"torchjac.divergence: f \\({type(mixer).__name__}\\): (a conv|dropout)"):
            torchjac.divergence(mixer, torch.randn(2, 3, 4))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn = nn.BatchNorm1d(3)

        def forward(self, x):
            return self.bn(x)

    with pytest.raises(ValueError, match=r"module 'bn' \(BatchNorm1d\): BatchNorm in training mode"):
        torchjac.jacobian(Block(), torch.randn(4, 3))


def test_cond_errors():
    with pytest.raises(ValueError, match=r"cond_features=2; pass cond of shape \(\.\.\., 2\)"):
        torchjac.jacobian(mlp(cond_features=2), torch.randn(4, 3))
    with pytest.raises(ValueError, match=r"cond expected last dim 2 \(f.cond_features\)"):
        torchjac.jacobian(mlp(cond_features=2), torch.randn(4, 3), cond=torch.randn(4, 5))
    with pytest.raises(ValueError, match="cond given, but f is a PointMLP with cond_features=0"):
        torchjac.jacobian(mlp(), torch.randn(4, 3), cond=torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"cond's leading dims \(3,\) do not broadcast against x's \(4,\)"):
        torchjac.jacobian(mlp(cond_features=2), torch.randn(4, 3), cond=torch.randn(3, 2))
    seq = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 3))
    with pytest.raises(ValueError, match="expected 5 input features"):
        torchjac.jacobian(seq, torch.randn(4, 3), cond=torch.randn(4, 2))


def test_chunk_size_and_activation_codes():
    with pytest.raises(ValueError, match="chunk_size expected a positive int or None, got 0"):
        torchjac.jacobian(mlp(), torch.randn(4, 3), chunk_size=0)
    x, cond, w, b = torch.randn(4, 3), torch.zeros(1, 0), [torch.randn(3, 3)], [torch.randn(3)]
    with pytest.raises(ValueError, match=r"activations: expected codes in \[0, 1, .* got \[42\]"):
        torch.ops.torchjac.mlp_jacobian(x, cond, w, b, [42], [0.0, 0.0], [])


def test_channels_first_v_needs_a_points_dim():
    f = nn.Sequential(nn.Conv1d(3, 3, 1))
    with pytest.raises(ValueError, match=r"with Conv1d layers v expected shape \(B, C, N\)"):
        torchjac.jvp(f, torch.randn(2, 3, 3), torch.randn(3))


def test_jvp_v_shape():
    with pytest.raises(ValueError, match=r"v expected 3 features like x, got shape \(4, 2\)"):
        torchjac.jvp(mlp(), torch.randn(4, 3), torch.randn(4, 2))
    with pytest.raises(ValueError, match=r"v expected leading dims that broadcast to \(4,\)"):
        torchjac.jvp(mlp(), torch.randn(4, 3), torch.randn(5, 4, 3))


def test_point_mlp_constructor_errors():
    with pytest.raises(ValueError, match="PointMLP: activation expected one of"):
        torchjac.PointMLP(3, [8], 3, activation="swishy")
    with pytest.raises(ValueError, match="activation expected a name or one of"):
        torchjac.PointMLP(3, [8], 3, activation=nn.Softmax(-1))
    with pytest.raises(ValueError, match=r"skip_layers expected indices in \[1, 1\]"):
        torchjac.PointMLP(3, [8], 3, skip_layers=(0,))
    with pytest.raises(ValueError, match="hidden_features expected a list of positive ints"):
        torchjac.PointMLP(3, [8, 0], 3)


def test_direct_op_call_errors_name_the_argument():
    x, cond = torch.randn(4, 3), torch.zeros(1, 0)
    w, b = [torch.randn(3, 3)], [torch.randn(3)]
    with pytest.raises(ValueError, match=r"mlp_jacobian: weights\[0\]: expected 3 input features"):
        torch.ops.torchjac.mlp_jacobian(x, cond, [torch.randn(3, 4)], b, [0], [0.0, 0.0], [])
    with pytest.raises(ValueError, match=r"biases\[0\]: expected shape \(3,\)"):
        torch.ops.torchjac.mlp_jacobian(x, cond, w, [torch.randn(2)], [0], [0.0, 0.0], [])
    with pytest.raises(ValueError, match="cond: expected 2 dims like x"):
        torch.ops.torchjac.mlp_jacobian(x, torch.zeros(0), w, b, [0], [0.0, 0.0], [])
    with pytest.raises(ValueError, match=r"noise: expected shape \(4, 'k', 3\)"):
        torch.ops.torchjac.mlp_hutchinson(x, cond, w, b, [0], [0.0, 0.0], [], torch.randn(4, 3))
    with pytest.raises(ValueError, match="two activation_params per layer"):
        torch.ops.torchjac.mlp_jacobian(x, cond, w, b, [0], [0.0], [])
