#!/usr/bin/env bash
# `make gpu-check`: the one command for a CUDA machine, no internet needed. It uses the Python
# that is there (torch with CUDA and triton preinstalled; PYTHON=... to pick another), and:
#   1. installs this checkout:    pip install --no-build-isolation --no-deps -e .
#   2. runs every test, the GPU ones included (pytest, if installed: nothing is downloaded),
#   3. runs the GPU benchmarks:   bench/run.py --device cuda --n 1024 4096 16384, fp32 and bf16
#      (torch.autocast), modes fwd bwd fwd_bwd, every provider available on the device; then fp32
#      once more with TF32 allowed on both sides (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which both
#      cuBLAS and the Triton kernels follow) into bench/results/tf32/,
#   4. plots them (bench/plot.py) and prints a summary.
# It stops itself before 8 minutes (each phase gets what is left of the budget). When $OUT is
# set, the CSVs, plots and logs are copied there.
set -u -o pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-470}
START=$(date +%s)
LOGS=bench/results/gpu-check-logs
mkdir -p "$LOGS"
declare -a SUMMARY=()

elapsed() { echo $(( $(date +%s) - START )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
phase() { echo; echo "=== $1  (at $(elapsed)s of ${BUDGET_S}s)"; }
note() { echo "$1"; SUMMARY+=("$1"); }
# run_for SECONDS LOG CMD...: run CMD with at most SECONDS, SIGINT first (pytest still prints its
# summary), output to the terminal and LOG; returns CMD's status (124: out of time).
run_for() {
    local seconds=$1 log=$2
    shift 2
    if (( seconds < 10 )); then
        echo "no time left for: $*" | tee -a "$log"
        return 124
    fi
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

phase "environment"
"$PY" - <<'EOF' 2>&1 | tee "$LOGS/environment.log"
import importlib.util, platform, sys
import torch
print(f"python {platform.python_version()}  torch {torch.__version__} (CUDA {torch.version.cuda})")
if importlib.util.find_spec("triton"):
    import triton
    print(f"triton {triton.__version__}")
else:
    print("triton: NOT INSTALLED (the triton backend will be unavailable)")
print("pytest:", "installed" if importlib.util.find_spec("pytest") else "NOT INSTALLED: tests will be skipped")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this check needs one")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}  {p.total_memory / 2**30:.0f} GiB  sm_{p.major}{p.minor}  {p.multi_processor_count} SMs")
print(f"fp32 matmul TF32 allowed by default: {torch.backends.cuda.matmul.allow_tf32}")
EOF
(( PIPESTATUS[0] == 0 )) || { echo "gpu-check: no usable CUDA torch, stopping"; exit 1; }
# The results' file name, as bench/harness.py spells the device.
GPU=$("$PY" -c "import sys, torch; sys.path.insert(0, 'bench'); import harness; print(harness.device_name(torch.device('cuda')))" \
      2>/dev/null || echo "<gpu>")

phase "install: pip install --no-build-isolation --no-deps -e ."
if "$PY" -m pip install --no-build-isolation --no-deps -e . >"$LOGS/install.log" 2>&1; then
    grep -h "ncrl_kernels: building" "$LOGS/install.log" || true
    note "install: ok ($(elapsed)s)"
else
    tail -n 40 "$LOGS/install.log"
    note "install: FAILED (see $LOGS/install.log); testing what is importable"
fi
"$PY" -c "import ncrl_kernels; print('backends on cuda:', ncrl_kernels.available_backends('cuda'))" \
    2>&1 | tee -a "$LOGS/install.log"

phase "tests: pytest (GPU tests included)"
: >"$LOGS/tests.log"
if "$PY" -c "import pytest" 2>/dev/null; then
    # Leave at least 3 minutes for the benchmarks.
    run_for $(( $(left) - 180 )) "$LOGS/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider
    status=$?
    result=$(grep -E "(passed|failed|error)" "$LOGS/tests.log" | tail -n 1)
    case $status in
        0) note "tests: ${result:-passed}" ;;
        124|130) note "tests: STOPPED at the time limit: ${result:-no summary}" ;;
        *) note "tests: FAILED (status $status): ${result:-see $LOGS/tests.log}" ;;
    esac
else
    note "tests: SKIPPED, pytest is not installed on this machine (no internet to install it)"
fi

phase "benchmarks: bench/run.py"
BENCH=(--device cuda --n 1024 4096 16384 --modes fwd bwd fwd_bwd --seconds 1)
if [[ -f bench/run.py ]]; then
    # One run per dtype, so that each appends its rows even if a later one runs out of time.
    run_for $(( $(left) - 120 )) "$LOGS/bench-fp32.log" "$PY" bench/run.py "${BENCH[@]}" --dtypes fp32
    note "benchmark fp32 (IEEE unless TF32 is on by default): status $? -> bench/results/$GPU.csv"
    run_for $(( $(left) - 60 )) "$LOGS/bench-bf16.log" "$PY" bench/run.py "${BENCH[@]}" --dtypes bf16
    note "benchmark bf16 (autocast): status $? -> bench/results/$GPU.csv"
    TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 run_for $(( $(left) - 20 )) "$LOGS/bench-fp32-tf32.log" \
        "$PY" bench/run.py "${BENCH[@]}" --dtypes fp32 --results bench/results/tf32
    note "benchmark fp32 with TF32 on both sides: status $? -> bench/results/tf32/$GPU.csv"
    phase "plots: bench/plot.py"
    "$PY" bench/plot.py bench/results/*.csv bench/results/tf32/*.csv 2>&1 | tee "$LOGS/plot.log"
else
    note "benchmarks: SKIPPED, bench/run.py is not in this checkout"
fi

phase "summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
for run in fp32 fp32-tf32 bf16; do
    if grep -q "vs eager" "$LOGS/bench-$run.log" 2>/dev/null; then
        echo "  $run: fused providers against eager, compiled and gemm-bound (bench/run.py's summary):"
        grep "vs eager" "$LOGS/bench-$run.log" | sed 's/^/  /'
    fi
done
echo "  total $(elapsed)s"

if [[ -n "${OUT:-}" ]]; then
    mkdir -p "$OUT"
    cp -f bench/results/*.csv bench/results/*.png "$OUT"/ 2>/dev/null
    for f in bench/results/tf32/*.csv bench/results/tf32/*.png; do
        [[ -f "$f" ]] && cp -f "$f" "$OUT/tf32-$(basename "$f")"
    done
    cp -f "$LOGS"/*.log "$OUT"/
    echo "  copied results and logs to $OUT"
fi
