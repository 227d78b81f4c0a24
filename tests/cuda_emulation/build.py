"""Builds the host emulation of the CUDA kernels and loads it into this process.

The real kernel sources (csrc/cuda/*.cu, through kernels_*.cpp) and the real
glue (csrc/cuda/*_glue.cpp) are compiled as C++ against the emulated runtime in
include/, which stands in for <cuda_runtime.h> and c10/cuda. The build is cached
in build/cuda_emulation[-<sanitizer>] and recompiles only what changed.

TORCHJAC_EMU_SANITIZER=address (ASan + UBSan) or thread (TSan) builds an
instrumented copy; python must then run with the sanitizer runtime preloaded
(`make emulation-asan`, `make emulation-tsan`). Both use the thread backend.
"""
import os

import torch
import torch.utils.cpp_extension as cpp_extension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CSRC = os.path.join(ROOT, "csrc")

SANITIZER_FLAGS = {
    "": [],
    "address": ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"],
    "thread": ["-fsanitize=thread"],
}

_loaded = False


def load():
    """Compiles (if needed) and loads the emulation; registers the torchjac_emu ops. Idempotent."""
    global _loaded
    if _loaded:
        return
    import torchjac  # noqa: F401  (the torchjac schemas and the reference ops the fallback calls)

    sanitizer = os.environ.get("TORCHJAC_EMU_SANITIZER", "")
    if sanitizer not in SANITIZER_FLAGS:
        raise ValueError(f"TORCHJAC_EMU_SANITIZER: expected one of {sorted(SANITIZER_FLAGS)}, got {sanitizer!r}")
    name = "torchjac_cuda_emulation" + (f"_{sanitizer}" if sanitizer else "")
    build_dir = os.path.join(ROOT, "build", "cuda_emulation" + (f"-{sanitizer}" if sanitizer else ""))
    os.makedirs(build_dir, exist_ok=True)
    sources = [os.path.join(HERE, f) for f in ("runtime.cpp", "register.cpp", "kernels_forward.cpp",
                                               "kernels_backward.cpp")]
    sources += [os.path.join(CSRC, "cuda", "mlp_forward_glue.cpp"), os.path.join(CSRC, "cuda", "mlp_backward_glue.cpp"),
                os.path.join(CSRC, "ops.cpp")]
    flags = ["-O2" if not sanitizer else "-O1", "-g0" if not sanitizer else "-g", "-DTORCHJAC_CUDA_EMULATION",
             "-DTORCHJAC_OPS_NAMESPACE=torchjac_emu", "-Wno-unknown-pragmas"] + SANITIZER_FLAGS[sanitizer]
    cpp_extension.load(
        name=name, sources=sources, extra_cflags=flags, extra_ldflags=SANITIZER_FLAGS[sanitizer],
        extra_include_paths=[os.path.join(HERE, "include"), HERE, CSRC, os.path.join(CSRC, "cuda")],
        build_directory=build_dir, is_python_module=False, verbose=os.environ.get("TORCHJAC_EMU_VERBOSE") == "1")
    _loaded = True


def redirect(on=True):
    """Makes the emulated kernels the CPU kernels of the torchjac ops (True), or undoes it (False)."""
    load()
    torch.ops.torchjac_emu.redirect(on)
