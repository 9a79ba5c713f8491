# make test   - create .venv, build pyprune, run the test suite (CPU + Triton interpreter)
# make bench  - create .venv, build pyprune, run the benchmark table (python -m benchmarks)
# make check-cuda - compile every CUDA source for sm_80, sm_90 and PTX against torch 2.14.1, sm_90 against 2.11.0
# make check-triton - compile every Triton kernel ahead of time for sm_80 and sm_90
# make gpu-report - sm_90 registers, spills, shared memory and occupancy of every CUDA and Triton
#                   kernel variant, no GPU needed (benchmarks/results/sm_90-resources.md)
# make package - sdist, a wheel built from it, installed into a fresh venv and smoke-tested
#                outside the checkout (.ci/package.sh)
# make gpu    - on the GPU machine: build, test, sanitize, benchmark (../shared/gpu/README.md)
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h csrc/cpu/*.cpp csrc/cpu/*.h csrc/cpu/avx2/*.cpp)

.PHONY: all build test test-cpu test-triton check-triton bench check-cuda gpu-report gpu clean

all: test

$(VENV)/.installed: requirements.txt
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -r requirements.txt
	touch $@

# The same layout as `make gpu` uses on the GPU machine: pyprune/_C built in place (ninja keeps
# the objects in build/, so rebuilds are incremental), pyprune.triton_kernels mapped from the
# checkout's triton_kernels/ by pyprune itself. A .pth file puts build/venv-path/ (one symlink,
# pyprune) on .venv's path, so pyprune imports from any directory without exposing the
# checkout's other top-level names (tests, benchmarks, triton_kernels).
VENV_PATH := build/venv-path
$(VENV)/.built: $(VENV)/.installed $(SOURCES)
	$(VPY) -m pip uninstall -q -y pyprune 2>/dev/null || true
	$(VPY) setup.py -q build_ext --inplace
	mkdir -p $(VENV_PATH) && ln -sfn ../../pyprune $(VENV_PATH)/pyprune
	echo "$(CURDIR)/$(VENV_PATH)" > "$$($(VPY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/pyprune-checkout.pth"
	cd / && $(CURDIR)/$(VPY) -c "import pyprune, pyprune.triton_kernels; print('pyprune', pyprune.__version__, 'from', pyprune.__file__)"
	touch $@

build: $(VENV)/.built

# pytest exit code 5 means no test ran: report it loudly and fail.
PYTEST = .ci/pytest_strict $(VPY) -m pytest --durations=25

# The three test processes: the CPU tests, and the interpreter's convolution and SAP tests and
# its rest (see test-triton below).
TEST_CPU = $(PYTEST) tests -m "not triton and not triton_aot" -q
TEST_TRITON_SECOND = TRITON_INTERPRET=1 $(PYTEST) $(TRITON_SECOND_TESTS) -m triton -q \
    -p no:cacheprovider
TEST_TRITON_REST = TRITON_INTERPRET=1 $(PYTEST) tests -m triton -q -p no:cacheprovider \
    $(TRITON_SECOND_TESTS:%=--ignore=%)

# make test: the CPU tests, then the interpreter's "rest", beside the interpreter's convolution
# and SAP tests (the longest process: the CPU tests fill the core it leaves); then check-triton.
test: build
	$(TEST_TRITON_SECOND) & second=$$!; \
	$(TEST_CPU); cpu=$$?; \
	$(TEST_TRITON_REST); rest=$$?; \
	wait $$second; second=$$?; \
	echo "test: CPU tests exit $$cpu; interpreter: convolution and SAP tests exit $$second," \
	    "the rest exit $$rest"; \
	test $$cpu -eq 0 && test $$rest -eq 0 && test $$second -eq 0
	$(MAKE) check-triton

test-cpu: build
	$(TEST_CPU)

# Triton's interpreter must be switched on before triton is imported: a separate process. The
# interpreter runs one Python thread, so the convolution and SAP tests (~42 min on this 2-core
# VM on a slow day) run in a second process beside the rest (~30 min; make test runs the CPU
# tests, ~13 min that day, before the rest); all must pass.
TRITON_SECOND_TESTS := tests/test_masked_conv.py tests/test_weight_mask_triton.py \
    tests/test_sap.py tests/test_sap_kernels.py tests/test_seeds.py
test-triton: build
	$(TEST_TRITON_SECOND) & second=$$!; \
	$(TEST_TRITON_REST); rest=$$?; \
	wait $$second; second=$$?; \
	echo "test-triton: convolution and SAP tests exit $$second, the rest exit $$rest"; \
	test $$rest -eq 0 && test $$second -eq 0

# Then the SASS checks of a few compiled variants (tests marked triton_aot in
# test_gpu_report.py; test_triton_aot.py repeats the compile above, one test a variant, and is
# left to explicit runs).
check-triton: build
	$(VPY) -m pyprune.triton_kernels.aot
	$(PYTEST) tests/test_gpu_report.py -m triton_aot -q

bench: build
	$(VPY) -m benchmarks

check-cuda:
	bash .ci/check_cuda.sh

# A passing check-cuda stamps torch 2.14.1's build (build/check-cuda), which gpu-report reads:
# gpu-report redoes the check only when a source it compiles has changed since.
CHECK_CUDA_STAMP := build/check-cuda/.checked
$(CHECK_CUDA_STAMP): $(SOURCES) $(wildcard csrc/cuda/*.cu csrc/cuda/*.h) .ci/check_cuda.sh
	bash .ci/check_cuda.sh

gpu-report: build $(CHECK_CUDA_STAMP)
	$(VPY) -m benchmarks.gpu_report

gpu:
	bash .ci/gpu.sh

.PHONY: package
package: $(VENV)/.installed
	bash .ci/package.sh

clean:
	rm -rf build *.egg-info pyprune/_C*.so $(VENV)/.built
