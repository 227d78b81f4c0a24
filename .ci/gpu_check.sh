#!/usr/bin/env bash
# make gpu-check: the whole validation of the CUDA kernels on a machine with a
# GPU, in one command, within 9 minutes on an H100/H200:
#   1. build the fused kernels for sm_90 (TORCH_CUDA_ARCH_LIST, default 9.0);
#   2. the CUDA tests (tests/test_cuda_*.py, the precision modes' error bounds
#      among them, and the second-order ops' pure-PyTorch path on CUDA), CUDA-graph capture
#      (torch.compile(mode="reduce-overhead")) included;
#   3. compute-sanitizer memcheck and racecheck on the tests' small cases;
#   4. the GPU benchmarks against the eager baselines, torch.compile of them and
#      torchjac's pure-PyTorch path, at 1M points, at each float32 matmul precision
#      (highest: 3xTF32, high: TF32, medium: BF16).
# Everything goes to bench/results/gpu_<date>_<commit>/, 7 files, each cut to
# under 16 MiB: summary.txt (device, driver, torch, commit, each step's status
# and time), build.txt, tests.txt, forward.{json,txt}, train.{json,txt}.
# Each step has a time limit; one that fails or runs out is marked in
# summary.txt and the others still run. Exit status: 0 when every step passed.
# Without CUDA it prints one line and exits 2.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

if ! "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" >/dev/null 2>&1; then
  echo "gpu-check: no CUDA device available to torch (torch.cuda.is_available() is False); nothing was run"
  exit 2
fi

commit=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
OUT=bench/results/gpu_$(date -u +%Y-%m-%d)_${commit}
mkdir -p "$OUT"
SUMMARY=$OUT/summary.txt
MAX_BYTES=$((16 * 1024 * 1024 - 4096))
failures=0

{
  echo "gpu-check at commit $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (with local changes)')"
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  "$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device', torch.cuda.get_device_name(0))"
  command -v nvcc >/dev/null && nvcc --version | tail -n 1
} > "$SUMMARY" 2>&1

# Every step's limit is cut to what is left of the whole run's budget.
DEADLINE=$((SECONDS + ${GPU_CHECK_SECONDS:-530}))

# step NAME LOG SECONDS COMMAND...: runs COMMAND with a time limit, appending to LOG.
step() {
  local name=$1 log=$2 limit=$3
  shift 3
  local start=$SECONDS left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 15 ]; then
    printf '%-28s %s\n' "$name" "NOT RUN (out of time)" >> "$SUMMARY"
    failures=$((failures + 1))
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name: $*" >> "$log"
  timeout --kill-after=10 "$limit" "$@" >> "$log" 2>&1
  local rc=$?
  local status=passed
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT after ${limit} s"; elif [ "$rc" -ne 0 ]; then status="FAILED (exit $rc)"; fi
  [ "$status" = passed ] || failures=$((failures + 1))
  printf '%-28s %-24s %4d s\n' "$name" "$status" $((SECONDS - start)) >> "$SUMMARY"
  echo "gpu-check: $name: $status"
}

export TORCHJAC_CUDA=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
step "build (sm_90)" "$OUT/build.txt" 240 "$PYTHON" -m pip install --no-build-isolation -e .
step "cuda tests" "$OUT/tests.txt" 180 "$PYTHON" -m pytest -q -rs tests/test_cuda_forward.py tests/test_cuda_backward.py \
  -k "not compute_sanitizer"
step "second order on cuda" "$OUT/tests.txt" 30 "$PYTHON" -m pytest -q -rs tests/test_second_order.py -k cuda
step "precision modes" "$OUT/tests.txt" 60 "$PYTHON" -m pytest -q -rs tests/test_cuda_precision.py
step "cuda-graph capture" "$OUT/tests.txt" 90 "$PYTHON" -m pytest -q tests/test_cuda_forward.py tests/test_cuda_backward.py \
  -k "compile_reduce_overhead"
if command -v compute-sanitizer >/dev/null 2>&1; then
  step "compute-sanitizer" "$OUT/tests.txt" 150 "$PYTHON" -m pytest -q tests/test_cuda_forward.py \
    tests/test_cuda_backward.py -k "compute_sanitizer and (memcheck or racecheck)"
else
  echo "compute-sanitizer            NOT RUN (not on PATH)" >> "$SUMMARY"
  failures=$((failures + 1))
fi
bench_tmp=$(mktemp -d)
step "bench forward" "$OUT/forward.txt" 200 "$PYTHON" bench/bench_gpu_forward.py --out "$bench_tmp/forward" \
  --points 1000000 --widths 128 --huge 0 --target-seconds 0.3 --max-reps 10 --precisions highest high medium
step "bench train" "$OUT/train.txt" 150 "$PYTHON" bench/bench_gpu_train.py --out "$bench_tmp/train" \
  --points 1000000 --no-search --target-seconds 0.3 --max-reps 10 --precisions highest high medium
for kind in forward train; do
  [ -f "$bench_tmp/$kind/results.json" ] && cp "$bench_tmp/$kind/results.json" "$OUT/$kind.json"
  [ -f "$bench_tmp/$kind/results.txt" ] && cat "$bench_tmp/$kind/results.txt" >> "$OUT/$kind.txt"
done
rm -rf "$bench_tmp"

for f in "$OUT"/*; do  # the size limit of committed results
  if [ "$(stat -c %s "$f")" -gt "$MAX_BYTES" ]; then
    tail -c "$MAX_BYTES" "$f" > "$f.cut" && mv "$f.cut" "$f"
  fi
done
echo "failed steps: $failures" >> "$SUMMARY"
echo "gpu-check: results in $OUT ($failures failed step(s))"
[ "$failures" -eq 0 ]
