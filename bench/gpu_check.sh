#!/usr/bin/env bash
# `make gpu-check`: the one command for a CUDA machine, no internet needed. It uses the Python
# that is there (torch with CUDA and triton preinstalled; PYTHON=... to pick another), and:
#   1. installs this checkout:    pip install --no-build-isolation --no-deps -e .
#   2. runs the GPU benchmarks, the point of a GPU run, first: bench/run.py --device cuda
#      --n 1024 4096 16384, modes fwd bwd fwd_bwd, every provider available on the device, for
#      fp32 with TF32 allowed on both sides (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1, which cuBLAS and
#      the Triton kernels follow; into bench/results/tf32/), bf16 (torch.autocast), then IEEE
#      fp32 (PyTorch's default). Rows are appended case by case, so a phase stopped at its time
#      limit keeps what it measured,
#   3. runs the GPU tests (pytest -m gpu), then the others if time is left (pytest, if installed:
#      nothing is downloaded),
#   4. plots the results (bench/plot.py) and prints a summary.
# It stops itself before 8 minutes (each phase gets what is left of the budget). When $OUT is
# set, the GPU CSVs, a summary and one archive of the results and logs are copied there (4 files:
# the device tool brings back at most 8).
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

phase "benchmarks: bench/run.py"
BENCH=(--device cuda --n 1024 4096 16384 --modes fwd bwd fwd_bwd --seconds 1)
# The three runs share what is left but TESTS_S (kept for the GPU tests): a third, half of the
# rest, then all of it; a run that finishes early leaves its time to the next. Each run appends
# its rows case by case.
TESTS_S=150
TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 run_for $(( ($(left) - TESTS_S) / 3 )) "$LOGS/bench-fp32-tf32.log" \
    "$PY" bench/run.py "${BENCH[@]}" --dtypes fp32 --results bench/results/tf32
note "benchmark fp32 with TF32 on both sides: status $? -> bench/results/tf32/$GPU.csv"
run_for $(( ($(left) - TESTS_S) / 2 )) "$LOGS/bench-bf16.log" "$PY" bench/run.py "${BENCH[@]}" --dtypes bf16
note "benchmark bf16 (autocast): status $? -> bench/results/$GPU.csv"
run_for $(( $(left) - TESTS_S )) "$LOGS/bench-fp32.log" "$PY" bench/run.py "${BENCH[@]}" --dtypes fp32
note "benchmark fp32 (IEEE unless TF32 is on by default): status $? -> bench/results/$GPU.csv"

phase "tests: pytest -m gpu, then the rest"
: >"$LOGS/tests.log"
if "$PY" -c "import pytest" 2>/dev/null; then
    for selection in "gpu" "not gpu"; do
        run_for $(( $(left) - 30 )) "$LOGS/tests.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider -m "$selection"
        status=$?
        result=$(grep -E "(passed|failed|error)" "$LOGS/tests.log" | tail -n 1)
        case $status in
            0) note "tests -m '$selection': ${result:-passed}" ;;
            124|130) note "tests -m '$selection': STOPPED at the time limit: ${result:-no summary}" ;;
            *) note "tests -m '$selection': FAILED (status $status): ${result:-see $LOGS/tests.log}" ;;
        esac
    done
else
    note "tests: SKIPPED, pytest is not installed on this machine (no internet to install it)"
fi

phase "plots: bench/plot.py"
"$PY" bench/plot.py bench/results/*.csv bench/results/tf32/*.csv 2>&1 | tee "$LOGS/plot.log"

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
    [[ -f "bench/results/$GPU.csv" ]] && cp -f "bench/results/$GPU.csv" "$OUT/"
    [[ -f "bench/results/tf32/$GPU.csv" ]] && cp -f "bench/results/tf32/$GPU.csv" "$OUT/tf32-$GPU.csv"
    for line in "${SUMMARY[@]}"; do echo "$line"; done >"$OUT/summary.txt"
    # Everything else, the CSVs included in case the device name above was not found.
    tar czf "$OUT/gpu-check.tar.gz" bench/results/*.csv bench/results/*.png bench/results/tf32 "$LOGS" 2>/dev/null
    echo "  copied the GPU CSVs, summary.txt and gpu-check.tar.gz (CSVs, plots, logs) to $OUT"
fi
