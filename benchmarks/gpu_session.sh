#!/usr/bin/env bash
# The one prepared run on a lent GPU (issue 18): versions, the kernel tests compiled on the GPU,
# the whole suite on that image's newer jax (CPU platform, in the background), the kernel
# benchmarks, then the ANN benchmark (vqlib on the GPU, faiss-cpu on the same machine's cores).
# Everything lands in $OUT (at most 8 files). Wheels the image lacks travel in .whl/ (carry it).
#
#   OUT=/tmp/out bash benchmarks/gpu_session.sh      # BUDGET=<seconds> for the benchmarks
set -u
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
if ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="$PWD:/tmp/site"
start=$(date +%s)
{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
    nproc
    grep -m1 "model name" /proc/cpuinfo
    python3 -c "import sys, jax, jaxlib, numpy, flax, optax; print(sys.version.split()[0], 'jax', jax.__version__, 'jaxlib', jaxlib.__version__, 'numpy', numpy.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
    python3 -c "import faiss, jaxtyping; print('faiss', faiss.__version__, 'jaxtyping', jaxtyping.__version__)"
    python3 -c "import triton; print('triton', triton.__version__)" 2>&1
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# 1. the whole suite on this jax, CPU platform, in the background (the GPU stays free for timing)
# (-v: one line per test as it ends, so a run cut short by its timeout still says what passed)
(JAX_PLATFORMS=cpu VQLIB_FUZZ_EXAMPLES=5 timeout "${SUITE_S:-280}" python3 -m pytest -v -n 12 -p no:cacheprovider \
    -p no:benchmark -rfE >"$OUT/suite_cpu.txt" 2>&1; echo "exit $?" >>"$OUT/suite_cpu.txt") &
suite=$!

# 2. kernel tests, compiled on the GPU (the interpreter variants run in the CPU pass); one
# invocation per op so that each prints its own failures before its time limit
for spec in test_lut_matmul:${LUT_S:-70} test_adc_topk:${ADC_S:-35} test_assign:${ASSIGN_S:-40}; do
    timeout "${spec#*:}" python3 -m pytest "tests/kernels/${spec%%:*}.py" -q -p no:cacheprovider -p no:benchmark \
        -o addopts="" -k "not interpret and not thin_dots" -W default -rfE --tb=short >>"$OUT/kernel_tests.txt" 2>&1
    echo "${spec%%:*} exit $?" >>"$OUT/kernel_tests.txt"
done
grep -E "passed|failed|exit|FAILED|ERROR" "$OUT/kernel_tests.txt" | cut -c1-250 | head -40

# 3. kernel benchmarks (cases past the budget are recorded as skipped)
timeout "${BENCH_S:-165}" python3 benchmarks/gpu_kernels.py ${BENCH_ARGS:---sections ceilings,kmeans_parts,lut_matmul,kmeans --repeats 20} --budget "${BUDGET:-130}" --json "$OUT/gpu_kernels.json" \
    >"$OUT/gpu_kernels.txt" 2>&1
echo "exit $?" >>"$OUT/gpu_kernels.txt"
grep -c '"ms' "$OUT/gpu_kernels.txt"
grep '"error"' "$OUT/gpu_kernels.txt" | cut -c1-300 | head -20

# 4. ANN: vqlib on the GPU against faiss-cpu on this machine's cores, once the suite is done
wait $suite
tail -n 30 "$OUT/suite_cpu.txt"
left=$(( ${TOTAL_S:-470} - $(date +%s) + start ))
if [ "$left" -gt 60 ]; then
    timeout "$left" python3 benchmarks/ann.py --dataset synthetic --n "${ANN_N:-1000000}" --queries 1000 --only IVF-Flat,IVF-PQ \
        --impls auto --out "$OUT/ann_gpu.json" >"$OUT/ann_gpu.txt" 2>&1
    echo "exit $?" >>"$OUT/ann_gpu.txt"
    tail -n 12 "$OUT/ann_gpu.txt"
fi
echo "total $(( $(date +%s) - start )) s"
