# Quick start on a fresh machine: `make test` and `make bench` do all the setup.
PYTHON ?= python3
TORCH_VERSION ?= 2.13.0

.PHONY: setup test bench fuzz cmake-check

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==$(TORCH_VERSION)
	$(PYTHON) -m pip install --quiet ninja pybind11 pytest hypothesis
	$(PYTHON) -m pip install --quiet --no-build-isolation -e .

test: setup
	$(PYTHON) -m pytest -q tests

bench: setup
	$(PYTHON) bench/bench_cpu.py

# The long fuzzing profile: 5000 random models against the autograd oracle (tests/fuzzing.py).
fuzz: setup
	$(PYTHON) -m pytest -q tests/test_fuzz.py --hypothesis-profile=long --hypothesis-show-statistics

# Builds the C++ library against the LibTorch of the installed torch, as a C++ user would.
cmake-check: setup
	cmake -S . -B build/cmake -G Ninja -DCMAKE_PREFIX_PATH="$$($(PYTHON) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	cmake --build build/cmake
