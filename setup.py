"""Builds torchjac._C: the op schemas, and the CUDA kernels when CUDA is available.

TORCHJAC_CUDA=1 forces the CUDA build (fails without nvcc), TORCHJAC_CUDA=0 skips it.
Unset, CUDA is built when torch is a CUDA build and nvcc is found.
Install with `pip install --no-build-isolation -e .` so the build uses the installed torch.
"""
import glob
import os
import sys
import sysconfig

from setuptools import find_packages, setup
from torch.utils import cpp_extension


def want_cuda():
    forced = os.environ.get("TORCHJAC_CUDA")
    if forced is not None:
        return forced not in ("0", "", "false", "False")
    return cpp_extension.CUDA_HOME is not None and __import__("torch").version.cuda is not None


def openmp_flags():
    """Compile (never link) with OpenMP when torch's intra-op threads are OpenMP's, so at::parallel_for in
    csrc/python/module.cpp runs on torch's own OpenMP runtime. Without it the chunks run one after another."""
    import torch
    # GCC's OpenMP calls (GOMP_*) bind to torch's libgomp; clang's (__kmpc_*) would not.
    gcc = "clang" not in os.environ.get("CXX", "c++") and not (sysconfig.get_config_var("CC") or "").startswith("clang")
    if sys.platform.startswith("linux") and gcc and "parallel backend: OpenMP" in torch.__config__.parallel_info():
        return ["-fopenmp"]
    return []


def extension():
    sources = sorted(glob.glob("csrc/*.cpp")) + sorted(glob.glob("csrc/python/*.cpp"))
    define_macros = [("Py_LIMITED_API", "0x03090000")]
    cxx = ["-O3"] + openmp_flags()  # the C++ standard is torch's own choice for extensions
    if want_cuda():
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        define_macros.append(("TORCHJAC_WITH_CUDA", None))
        # No --use_fast_math: approximate sinf/expf/division would break float32 accuracy.
        nvcc = ["-O3", "-lineinfo"]
        return cpp_extension.CUDAExtension(
            "torchjac._C", sources, define_macros=define_macros, py_limited_api=True,
            include_dirs=[os.path.abspath("csrc")],
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    return cpp_extension.CppExtension(
        "torchjac._C", sources, define_macros=define_macros, py_limited_api=True,
        include_dirs=[os.path.abspath("csrc")], extra_compile_args={"cxx": cxx},
    )


setup(
    name="torchjac",
    version="0.1.0",
    description="Fast, trainable, compilable per-point Jacobians and divergences of point-wise MLPs",
    packages=find_packages(include=["torchjac", "torchjac.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
    python_requires=">=3.9",
)
