#!/usr/bin/env bash
# Compile-checks the CUDA sources on a machine without a GPU:
#   1. every csrc/cuda/*.cu (torch-independent) with nvcc -c for sm_80 and sm_90, and for
#      sm_75, where the tensor-core code must compile out (torch's default arch list has 7.x);
#   2. every csrc/cuda/*.cpp (the torch glue) with the host compiler, against
#      torch's headers and the CUDA headers, as setup.py would with TORCHJAC_WITH_CUDA.
# Works with the CPU-only torch wheel (only its headers are used). Exits
# non-zero on any compile error; exits 0 with a message when nvcc is missing.
#
# Environment: NVCC (default nvcc), CUDA_HOME (default: from nvcc's path), CXX (default g++), PYTHON (default python3),
# NVCC_THREADS (parallel arch compiles, default 2).
set -uo pipefail
cd "$(dirname "$0")/.."

NVCC=${NVCC:-nvcc}
CXX=${CXX:-g++}
PYTHON=${PYTHON:-python3}
NVCC_THREADS=${NVCC_THREADS:-2}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "check_cuda_compile: SKIPPED: '$NVCC' not found (set NVCC or install the CUDA toolkit)"
  exit 0
fi
# Ask nvcc where its toolkit is: nvcc may be a wrapper script outside it.
CUDA_HOME=${CUDA_HOME:-$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)}
CUDA_INCLUDE="$CUDA_HOME/include"
if ! TORCH_INCLUDE=$("$PYTHON" -c "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'include'))"); then
  echo "check_cuda_compile: FAILED: '$PYTHON' cannot import torch (needed for its headers)"
  exit 1
fi

OUT=$(mktemp -d /tmp/torchjac_cuda_check.XXXXXX)
trap 'rm -rf "$OUT"' EXIT
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

echo "check_cuda_compile: $("$NVCC" --version | tail -n 1)"
failures=0
total_start=$(now)

# Same flags as setup.py's nvcc flags, minus --use_fast_math (the kernels refuse it).
NVCC_FLAGS=(-std=c++17 -O3 -lineinfo --threads "$NVCC_THREADS"
            -gencode arch=compute_75,code=sm_75 -gencode arch=compute_80,code=sm_80
            -gencode arch=compute_90,code=sm_90 -Icsrc)
for src in csrc/cuda/*.cu; do
  [ -e "$src" ] || continue
  start=$(now)
  if "$NVCC" "${NVCC_FLAGS[@]}" -c "$src" -o "$OUT/$(basename "$src").o"; then
    echo "  ok    $src (sm_75 + sm_80 + sm_90): $(elapsed "$start") s"
  else
    echo "  FAIL  $src"
    failures=$((failures + 1))
  fi
done

# The CPU wheel lacks this generated header; it only sets export macros.
EXTRA_DEFS=()
if [ ! -e "$TORCH_INCLUDE/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  EXTRA_DEFS+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi
CXX_FLAGS=(-std=c++17 -fsyntax-only -Wall -Wextra -DTORCHJAC_WITH_CUDA "${EXTRA_DEFS[@]}"
           -isystem "$TORCH_INCLUDE" -isystem "$TORCH_INCLUDE/torch/csrc/api/include"
           -isystem "$CUDA_INCLUDE" -Icsrc)
for src in csrc/cuda/*.cpp; do
  [ -e "$src" ] || continue
  start=$(now)
  if "$CXX" "${CXX_FLAGS[@]}" "$src"; then
    echo "  ok    $src (host syntax check): $(elapsed "$start") s"
  else
    echo "  FAIL  $src"
    failures=$((failures + 1))
  fi
done

echo "check_cuda_compile: total $(elapsed "$total_start") s, $failures failure(s)"
[ "$failures" -eq 0 ]
