#!/usr/bin/env bash
# The GPU checks in one run on the device machine (an H200; 15 minutes of device time a
# session, start included): float32 accuracy on each GPU backend against NumPy float64
# (docs/scripts/device_accuracy.py), the conformance tests on PyTorch CUDA and CuPy, then the
# benchmark on the GPU (PyTorch, CuPy, JAX, SDPA, performer-pytorch) in float32 and in
# bfloat16, at L = 4096, 16384 and 65536.
#
#   here:  bash docs/scripts/device_wheels.sh          (wheels into .whl/)
#   there: run(command="bash docs/scripts/device_run.sh", carry=[".whl"], timeout_s=600)
#
# Every part has its own time limit (TESTS_S, BENCH_S seconds), so that the run ends within
# one call and whatever finished comes back. Results in $OUT (or device-results/): gpu.txt,
# accuracy.txt, tests.log, bench-float32.log/.json, bench-bfloat16.log/.json.
set -u
out=${OUT:-device-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD:$PWD/backends PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # JAX shares the GPU with PyTorch and CuPy
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    python3 -c "import sys, torch, jax, cupy, numpy; print(sys.version.split()[0], 'torch', torch.__version__, 'jax', jax.__version__, jax.devices(), 'cupy', cupy.__version__, 'numpy', numpy.__version__)"
} > "$out/gpu.txt" 2>&1
timeout 120 python3 docs/scripts/device_accuracy.py > "$out/accuracy.txt" 2>&1
workers=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
timeout "${TESTS_S:-180}" env FAVORCORE_BACKENDS=torch_cuda,cupy python3 -m pytest -q \
    -p no:cacheprovider $workers --maxfail=20 tests > "$out/tests.log" 2>&1
echo "tests exit status $?" >> "$out/tests.log"
for dtype in float32 bfloat16; do
    timeout "${BENCH_S:-140}" python3 -m favorcore bench --device gpu --dtype "$dtype" \
        --lengths 4096 16384 65536 --repeats 10 --no-plots --out "/tmp/bench-$dtype" \
        --methods favorcore-torch favorcore-cupy favorcore-jax sdpa performer \
        > "$out/bench-$dtype.log" 2>&1
    echo "bench exit status $?" >> "$out/bench-$dtype.log"
    cp "/tmp/bench-$dtype/bench.json" "$out/bench-$dtype.json" 2>/dev/null
done
tail -n 5 "$out/tests.log"
cat "$out/gpu.txt" "$out/accuracy.txt" "$out"/bench-*.log
