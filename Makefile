# Quick start on a fresh machine: `make test` and `make bench` do all the setup.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: setup test emulation emulation-asan emulation-tsan bench fuzz cmake-check gpu-check

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install --quiet ninja pybind11 pytest hypothesis
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .

test: setup
	$(PYTHON) -m pytest -q tests
	$(MAKE) --no-print-directory emulation

# The CUDA tests against the host emulation of the kernels (tests/cuda_emulation),
# in two processes: the backward tests take the longest. One torch thread each, as
# the two share the machine's cores (two threads each made both a third slower).
# The build is cached in build/.
EMULATE = TORCHJAC_EMULATE_CUDA=1 OMP_NUM_THREADS=1 $(PYTHON) -m pytest -q -p no:cacheprovider
emulation:
	$(PYTHON) -c "import sys; sys.path.insert(0, 'tests'); from cuda_emulation import build; build.load()"
	$(EMULATE) tests/test_cuda_backward.py & backward=$$!; \
	$(EMULATE) tests/test_cuda_forward.py tests/test_cuda_emulation.py tests/test_cuda_precision.py; forward=$$?; \
	wait $$backward && exit $$forward

# On demand, not in `make test`: the emulation built with ASan + UBSan, or with
# TSan, on the thread backend, over a sample of the CUDA tests.
SANITIZED_SAMPLE = tests/test_cuda_forward.py tests/test_cuda_backward.py -k "test_jvp or (test_cond_layouts and shared)"
emulation-asan:
	TORCHJAC_EMU_SANITIZER=address LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	  ASAN_OPTIONS=detect_leaks=0 $(EMULATE) -x $(SANITIZED_SAMPLE)
emulation-tsan:
	TORCHJAC_EMU_SANITIZER=thread LD_PRELOAD="$$(gcc -print-file-name=libtsan.so)" \
	  TSAN_OPTIONS="report_signal_unsafe=0" $(EMULATE) -x $(SANITIZED_SAMPLE)

bench: setup
	$(PYTHON) -m pip install --quiet matplotlib
	$(PYTHON) bench/bench_cpu.py
	$(PYTHON) bench/bench_models.py

# The long fuzzing profile: 5000 random models against the autograd oracle (tests/fuzzing.py).
fuzz: setup
	$(PYTHON) -m pytest -q tests/test_fuzz.py --hypothesis-profile=long --hypothesis-show-statistics

# Builds the C++ library against the LibTorch of the installed torch, as a C++ user would.
cmake-check: setup
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake

# The whole validation on a machine with a GPU (.ci/gpu_check.sh): build for sm_90,
# the CUDA tests, compute-sanitizer, CUDA graphs and the GPU benchmarks, into
# bench/results/. Without CUDA it says so and fails within seconds.
gpu-check:
	bash .ci/gpu_check.sh
