#!/usr/bin/env bash
# Device check of the CUDA engine (issue 7): build on the GPU machine, run the GPU
# tests and the timings, in one call (~5-8 minutes). From this repository's root:
#
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl cmeel-eigen scipy-openblas32
#   then, with the device tool:  run(command="bash benchmarks/gpu_check.sh", carry=[".whl"], timeout_s=560)
#
# The machine's image has CUDA 13 (nvcc), CMake, ninja, PyTorch, numpy, pytest,
# scikit-build-core and pybind11; only Eigen and OpenBLAS travel as wheels.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
t0=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL=16 python3 -m pip install -q --no-build-isolation --no-deps --no-index --target /tmp/site \
    -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 . > "$OUT/build.txt" 2>&1 || { tail -40 "$OUT/build.txt"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
cd /tmp && python3 -c "import lsprune; print(lsprune._core.build_info(), 'devices:', lsprune.cuda_device_count())" && cd - >/dev/null
python3 -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_selection.py tests/test_statistics.py 2>&1 \
    | tee "$OUT/tests.txt" | tail -15
(cd benchmarks && timeout 420 python3 gpu_bench.py) 2>&1 | tee "$OUT/bench.txt" | tail -30
cp benchmarks/results/gpu.md benchmarks/results/gpu.json "$OUT/" 2>/dev/null || true
