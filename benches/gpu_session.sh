#!/usr/bin/env bash
# Everything this project measures on a lent GPU machine, in one call (a lease is ~15 minutes):
#   env          GPU, driver, host CPU, torch/triton versions
#   rust_tests   the Rust kernel tests on the host's CPU (often another AVX-512 CPU than ours)
#   triton       benches/bench_triton.py: kernels == reference on the GPU, kernel GB/s, fp16 steps
#   train        the real entry point: python -m nanochat.train on nano-125m, fp16, on the GPU
#   profile      bench_train.py: the step as train.py runs it (Muon), and where its GPU time goes
#   compile      bench_triton.py --compile: the training step under torch.compile
#   rust_bench   the criterion kernel bench (quick mode) on the host's CPU, all its threads
# Each stage has its own time limit and log; a failed stage does not stop the next. Logs go to
# $OUT (the device tool's folder) or runs/gpu_session, packed after every stage into logs.tgz.
# All stages take ~6-8 minutes on an H200; SKIP="compile rust_bench" leaves stages out (a rerun).
#
# The host has no Rust toolchain: build the two Rust binaries here and carry them in .gpu/ (git
# ignores it; name it in the device call's carry list):
#   cargo test --release --no-run   -> target/release/deps/_ternary-*  (the unittests one) -> .gpu/ternary-tests
#   cargo bench --no-run            -> target/release/deps/kernels-*                       -> .gpu/kernels-bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu_session}
LOGS=$(mktemp -d)
PY=${PY:-python3}
export PYTHONPATH="$PWD/python:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
unset TRITON_INTERPRET

stage() {  # stage NAME LIMIT_S CMD...: run CMD under a time limit, log it, show its tail, pack logs
    local name=$1 limit=$2 t0=$SECONDS rc
    shift 2
    if [[ " ${SKIP:-} " == *" $name "* ]]; then echo "== $name skipped (SKIP) =="; return; fi
    echo "== $name (limit ${limit} s) =="
    timeout --signal=INT --kill-after=10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
    rc=$?
    grep -v -E "^\s*$|it/s\]|s/it\]" "$LOGS/$name.log" | tail -n "${TAIL:-25}"
    echo "== $name: exit $rc after $((SECONDS - t0)) s =="
    tar czf "$OUT/logs.tgz" -C "$LOGS" .
}

env_info() {
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv
    lscpu | grep -E "^(Model name|CPU\(s\)|Thread|Core|Socket|NUMA node|L3)"
    grep -o -w -E "avx2|avx512f|avx512bw|avx512vl|avx512_vnni|gfni" /proc/cpuinfo | sort | uniq -c
    "$PY" -c "import sys, torch, triton, numpy; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
}

export -f env_info
export PY
stage env 30 bash -c env_info
if [ -x .gpu/ternary-tests ]; then
    stage rust_tests 60 .gpu/ternary-tests
else
    echo "== rust_tests skipped: no .gpu/ternary-tests (see the top of this script) =="
fi
TAIL=45 stage triton 150 "$PY" benches/bench_triton.py --json "$LOGS/bench_triton.json"
rm -rf /tmp/gpu_session_run  # a fresh run each time (an existing run folder would need --resume)
stage train 120 "$PY" -m nanochat.train --preset nano-125m --device cuda:0 --precision fp16 \
    --batch-size 16 --seq-len 2048 --steps 120 --eval-interval 40 --checkpoint-interval 120 \
    --out /tmp/gpu_session_run --no-progress
mkdir -p "$LOGS/run_nano125m"  # the metrics, plot and samples come back; the weights stay behind
cp /tmp/gpu_session_run/*.{json,jsonl,png,md} "$LOGS/run_nano125m/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$LOGS" .
TAIL=45 stage profile 90 "$PY" benches/bench_train.py --preset nano-125m --device cuda --precision fp16 \
    --batch-size 16 --seq-len 2048 --no-plain --warmup 3 --steps 8 --profile 2 --trace "$LOGS/trace.json.gz"
stage compile 150 "$PY" benches/bench_triton.py --skip-kernels --compile --modes fp16,triton --json "$LOGS/bench_triton_compile.json"
if [ -x .gpu/kernels-bench ]; then
    TAIL=60 stage rust_bench 110 .gpu/kernels-bench --bench
else
    echo "== rust_bench skipped: no .gpu/kernels-bench (see the top of this script) =="
fi
