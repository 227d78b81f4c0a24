"""Where tests/test_cuda_forward.py and tests/test_cuda_backward.py run.

On a machine with CUDA they run the fused kernels on the device. With
TORCHJAC_EMULATE_CUDA=1 they run them in the host emulation instead
(tests/cuda_emulation): the same kernel and glue sources, compiled for the
host, on CPU tensors, every call under two thread schedules that must agree
bitwise. `make test` does both where it can. Without either, they are skipped.
"""
import os

import pytest
import torch

EMULATED = os.environ.get("TORCHJAC_EMULATE_CUDA") == "1"

if EMULATED:
    from cuda_emulation import build

    build.redirect(True)
    DEVICE = "cpu"
else:
    DEVICE = "cuda"

requires_kernels = pytest.mark.skipif(not (EMULATED or torch.cuda.is_available()),
                                      reason="needs a CUDA device (or TORCHJAC_EMULATE_CUDA=1 for the emulation)")
# What the emulation cannot stand in for: a second device, CUDA graphs, a CUDA subprocess.
needs_real_gpu = pytest.mark.skipif(EMULATED, reason="needs a real CUDA device, not the emulation")
