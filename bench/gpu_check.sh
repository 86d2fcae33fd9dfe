#!/usr/bin/env bash
# `make gpu-check`: the one command for a CUDA machine, no internet needed. A lent GPU gives about
# 10 minutes of command time, once, so the decisive figures come first and every phase keeps what
# it measured if it is stopped. It uses the Python that is there (torch with CUDA and triton
# preinstalled; PYTHON=... to pick another), and:
#   1. starts `pip install --no-build-isolation --no-deps -e .` in the background (the CUDA
#      extension takes 1-2 minutes to compile; MAX_JOBS = half the cores and nice 19, so the
#      host-bound benchmarks keep theirs) and meanwhile runs the Triton backend from the source tree,
#      first checking that its launches (LeanLaunch) give JITFunction.run's bits on this GPU (if
#      not, the rest runs with NCRL_KERNELS_LEAN_LAUNCH=0):
#   2. decisive: N=4096 forward + backward, bf16 autocast and fp32 with TF32 on both sides
#      (TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1; into bench/results/tf32/), providers fused-triton,
#      eager, compiled and gemm-bound, time and peak memory, rows appended case by case, the bf16
#      steps also replayed from a CUDA graph (rows "<provider>+graph": GPU time alone); then where
#      a fused step's time goes (bench/step_profile.py: GPU kernels against host time, and the
#      host's time to the weight grad's launch, which a host-bound step waits for),
#   3. the Triton GPU tests (tests/test_triton.py -m gpu: DocRED size, determinism, memory, 3xTF32;
#      torch.compile, then every candidate config, last),
#   4. once the build is done (or, at the latest, 250 s before the end of the budget; where it
#      failed or was stopped, the rest runs from the source tree): what each call path costs the
#      host (bench/host_path.py), the other GPU tests and the fused-cuda rows at N=4096,
#   5. N=1024 and 16384 (fwd, bwd, fwd_bwd), bf16 and TF32, then IEEE fp32 at N=4096,
#   6. a whole training step: ATLOP's DocREModel with a BERT-base-sized encoder, fused against the
#      unfused head (bench/atlop_step.py),
#   7. every Triton kernel's candidate configs alone (bench/kernels.py: bf16 from fp32 hs and ts,
#      and TF32) and the roofline model,
#   8. plots and a summary (fused against eager, compiled and gemm-bound).
# The whole stops itself before GPU_CHECK_BUDGET_S (default 530 s; the plots may take 15 s more). When $OUT is
# set, the GPU CSVs, a summary and one archive of the results and logs are copied there at every
# phase and on exit, so a run stopped from outside still returns what it measured.
# GPU_CHECK_DRY_RUN=1 runs the logic without a GPU: each command is printed, not run, and the clock
# advances by its expected duration, which shows the timeline the budget gives.
set -u -o pipefail
shopt -s nullglob
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
BUDGET_S=${GPU_CHECK_BUDGET_S:-530}
DRY=${GPU_CHECK_DRY_RUN:-0}
START=$(date +%s)
VIRTUAL=0  # seconds a dry run pretends its commands took
LOGS=bench/results/gpu-check-logs
mkdir -p "$LOGS"
# A real run starts with no logs (the phases append to theirs); a dry run keeps the last real run's.
[[ $DRY == 1 ]] || rm -f "$LOGS"/*.log
declare -a SUMMARY=()

GPU="<gpu>"  # the results' file name, as bench/harness.py spells the device (set below)

elapsed() { echo $(( $(date +%s) - START + VIRTUAL )); }
left() { echo $(( BUDGET_S - $(elapsed) )); }
note() { echo "$1"; SUMMARY+=("$1"); }
# save_results: copy what is measured so far to $OUT, if set: the GPU CSVs, summary.txt and one
# archive of the results and logs (the device tool returns $OUT even from a command it stopped).
# Each file is written beside its place and then renamed into it, so that a stop in the middle
# leaves the previous copy whole.
save_results() {
    [[ -n "${OUT:-}" && $DRY != 1 ]] || return 0
    mkdir -p "$OUT"
    local csv partial="$OUT/partial.tmp"
    for csv in "bench/results/$GPU.csv" "bench/results/$GPU-kernels.csv" "bench/results/$GPU-atlop-step.csv" \
               "bench/results/$GPU-host-path.csv"; do
        [[ -f $csv ]] && cp -f "$csv" "$partial" && mv -f "$partial" "$OUT/${csv##*/}"
    done
    [[ -f "bench/results/tf32/$GPU.csv" ]] && cp -f "bench/results/tf32/$GPU.csv" "$partial" \
        && mv -f "$partial" "$OUT/tf32-$GPU.csv"
    printf '%s\n' "${SUMMARY[@]}" >"$partial" && mv -f "$partial" "$OUT/summary.txt"
    # Everything else, the CSVs included in case the device name was not found.
    tar czf "$partial" bench/results/*.csv bench/results/*.png bench/results/tf32 "$LOGS" 2>/dev/null \
        && mv -f "$partial" "$OUT/gpu-check.tar.gz"
    return 0
}
# On exit, also when stopped from outside: save, then end what may still run (the install's
# process group; each run_for's timeout passes the signal on to its command).
on_exit() {
    save_results
    if [[ -n "${INSTALL_PID:-}" ]] && kill -0 "$INSTALL_PID" 2>/dev/null; then
        kill -- "-$INSTALL_PID" 2>/dev/null || kill "$INSTALL_PID"
    fi
    pkill -TERM -P $$ 2>/dev/null
    [[ -z "${SOURCE_TREE:-}" ]] || rm -rf "${SOURCE_TREE%/src}"
    return 0
}
trap on_exit EXIT
phase() { save_results; echo; echo "=== $1  (at $(elapsed)s of ${BUDGET_S}s)"; }
# run_for SECONDS EXPECTED LOG CMD...: run CMD with at most SECONDS, SIGINT first (pytest still
# prints its summary), output to the terminal and LOG; returns CMD's status (124: out of time).
# EXPECTED is what a dry run pretends it took.
run_for() {
    local seconds=$1 expected=$2 log=$3
    shift 3
    if (( seconds < 10 )); then
        echo "no time left for: $*" | tee -a "$log"
        return 124
    fi
    if [[ $DRY == 1 ]]; then
        local took=$(( expected < seconds ? expected : seconds ))
        echo "[dry run] limit ${seconds}s, takes ~${took}s: $*"
        VIRTUAL=$(( VIRTUAL + took ))
        (( expected < seconds )) && return 0
        echo "[dry run] CUT: expects ${expected}s, gets ${seconds}s"
        return 124
    fi
    timeout --signal=INT --kill-after=20 "$seconds" "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

phase "environment"
if [[ $DRY == 1 ]]; then
    echo "[dry run] no GPU needed; commands are printed, not run"
    GPU="<gpu>"
else
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
print("transformers:", "installed" if importlib.util.find_spec("transformers")
      else "NOT INSTALLED: bench/atlop_step.py will be skipped")
if not torch.cuda.is_available():
    sys.exit("no CUDA device visible to torch: this check needs one")
for i in range(torch.cuda.device_count()):
    p = torch.cuda.get_device_properties(i)
    print(f"cuda:{i} {p.name}  {p.total_memory / 2**30:.0f} GiB  sm_{p.major}{p.minor}  {p.multi_processor_count} SMs")
print(f"fp32 matmul precision: {torch.backends.cuda.matmul.fp32_precision}")
EOF
    (( PIPESTATUS[0] == 0 )) || { echo "gpu-check: no usable CUDA torch, stopping"; exit 1; }
    GPU=$("$PY" -c "import sys, torch; sys.path.insert(0, 'bench'); import harness; print(harness.device_name(torch.device('cuda')))" \
          2>/dev/null || echo "<gpu>")
fi

phase "install in the background: pip install --no-build-isolation --no-deps -e ."
JOBS=$(( $(nproc) / 2 > 0 ? $(nproc) / 2 : 1 ))
if [[ $DRY == 1 ]]; then
    echo "[dry run] MAX_JOBS=$JOBS pip install ... (about 90 s, beside the next phases)"
    INSTALL_DONE_AT=$(( $(elapsed) + 90 ))
else
    # nice: the compiler must not take the cores from the host-bound measurements beside it;
    # -v: the log says what setup.py built (CUDA or CPU only); setsid: a process group of its own,
    # so that stopping it stops its compilers too (a background job of this script is no group
    # leader, so setsid does not fork: INSTALL_PID is the group's id).
    SETSID=()
    command -v setsid >/dev/null && SETSID=(setsid)
    MAX_JOBS=$JOBS "${SETSID[@]}" nice -n 19 "$PY" -m pip install -v --no-build-isolation --no-deps -e . \
        >"$LOGS/install.log" 2>&1 &
    INSTALL_PID=$!
fi
# Until the install is done, the package runs from the source tree: a folder holding ncrl_kernels's
# files and triton_kernels under its installed name (the C++/CUDA extension is not loaded there, so
# each import prints an ExtensionNotLoadedWarning: expected in these phases).
SOURCE_TREE=$(mktemp -d)/src
mkdir -p "$SOURCE_TREE/ncrl_kernels"
for f in "$PWD"/ncrl_kernels/*; do ln -sfn "$f" "$SOURCE_TREE/ncrl_kernels/"; done
ln -sfn "$PWD/triton_kernels" "$SOURCE_TREE/ncrl_kernels/triton_kernels"
# PYTHONSAFEPATH: `python -m pytest` would otherwise import ncrl_kernels from the working directory first.
from_source() { PYTHONSAFEPATH=1 PYTHONPATH="$SOURCE_TREE${PYTHONPATH:+:$PYTHONPATH}" "$@"; }
# How the phases after the install run the package: installed, or from the source tree where the
# install failed or did not finish in time (without the extension then, but with the Triton backend).
PKG=from_source
# wait_for_install: wait for the install, at most until INSTALL_LEFT_S seconds of the budget are left.
INSTALL_LEFT_S=250
wait_for_install() {
    if [[ $DRY == 1 ]]; then
        (( $(elapsed) >= INSTALL_DONE_AT )) || VIRTUAL=$(( VIRTUAL + INSTALL_DONE_AT - $(elapsed) ))
        note "install: ok (dry run)"
        PKG=
        return 0
    fi
    while kill -0 "$INSTALL_PID" 2>/dev/null && (( $(left) > INSTALL_LEFT_S )); do sleep 2; done
    if kill -0 "$INSTALL_PID" 2>/dev/null; then
        kill -- "-$INSTALL_PID" 2>/dev/null || kill "$INSTALL_PID"
        note "install: NOT DONE at $(elapsed)s, stopped (see $LOGS/install.log); the rest runs from the source tree"
    elif wait "$INSTALL_PID"; then
        grep -h "ncrl_kernels: building" "$LOGS/install.log" || true
        note "install: ok (done at $(elapsed)s); backends on cuda: $("$PY" -c \
            "import ncrl_kernels; print(' '.join(ncrl_kernels.available_backends('cuda')))" 2>&1 | tail -n 1)"
        PKG=
    else
        tail -n 40 "$LOGS/install.log"
        note "install: FAILED (see $LOGS/install.log); the rest runs from the source tree"
    fi
}

run_tests() {  # run_tests LIMIT EXPECTED LABEL PYTEST-ARGS...: pytest's status (0 where it is missing)
    local limit=$1 expected=$2 label=$3
    shift 3
    if [[ $DRY != 1 ]] && ! "$PY" -c "import pytest" 2>/dev/null; then
        note "tests $label: SKIPPED, pytest is not installed on this machine (no internet to install it)"
        return 0
    fi
    run_for "$limit" "$expected" "$LOGS/tests-$label.log" "$PY" -m pytest -q -rfEs -p no:cacheprovider "$@"
    local status=$? result
    [[ $DRY == 1 ]] && return "$status"  # nothing ran
    result=$(grep -E "(passed|failed|error|skipped|deselected|no tests ran)" "$LOGS/tests-$label.log" | tail -n 1)
    case $status in
        0) if [[ $result == *passed* ]]; then note "tests $label: $result"
           else note "tests $label: NOTHING PASSED: ${result:-no summary}"; fi ;;
        124|130) note "tests $label: STOPPED at the time limit: ${result:-no summary}" ;;
        *) note "tests $label: FAILED (status $status): ${result:-see $LOGS/tests-$label.log}" ;;
    esac
    return "$status"
}

phase "LeanLaunch against Triton's JITFunction.run on this GPU"
# LeanLaunch, which launches the Triton kernels, calls Triton's compiled kernels through Triton
# internals, checked here only with their C launcher stubbed out (bench/launch_overhead.py). Where
# its results or its route differ from JITFunction.run's on this GPU, or the check fails, every
# later phase launches through JITFunction.run instead (bench/run.py's rows say fused-triton-jit).
# A check that runs out of time (compiling beside the extension's build) leaves it on, unverified.
from_source run_tests $(( $(left) - 470 )) 25 lean-launch -m gpu -k test_lean_launch_gives_jit_run_bits \
    tests/test_triton.py
case $? in
    0) ;;
    124|130) note "LeanLaunch: its check ran out of time; left on, not verified on this GPU" ;;
    *) export NCRL_KERNELS_LEAN_LAUNCH=0
       note "LeanLaunch: OFF for the rest of this check (NCRL_KERNELS_LEAN_LAUNCH=0), see $LOGS/tests-lean-launch.log" ;;
esac

phase "decisive: N=4096 forward + backward, bf16 and TF32"
BENCH=(bench/run.py --device cuda)
DECISIVE=(--seconds 1 --n 4096 --modes fwd_bwd --providers fused-triton eager compiled gemm-bound)
# bf16 with --cuda-graphs: each step also replayed from a CUDA graph, the GPU time without the
# host's (the third run's host took twice the fused step's GPU time to issue it).
from_source run_for $(( $(left) - 400 )) 55 "$LOGS/bench-bf16.log" "$PY" "${BENCH[@]}" "${DECISIVE[@]}" --dtypes bf16 \
    --cuda-graphs
note "decisive bf16 N=4096: status $? -> bench/results/$GPU.csv"
from_source run_for $(( $(left) - 365 )) 35 "$LOGS/bench-fp32-tf32.log" env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 \
    "$PY" "${BENCH[@]}" "${DECISIVE[@]}" --dtypes fp32 --results bench/results/tf32
note "decisive TF32 N=4096: status $? -> bench/results/tf32/$GPU.csv"
from_source run_for $(( $(left) - 340 )) 12 "$LOGS/step-profile.log" "$PY" bench/step_profile.py --n 4096 \
    --dtype bf16 --provider fused-triton
note "step profile, bf16 N=4096: $(grep -h '^model:' "$LOGS/step-profile.log" 2>/dev/null | tail -1)"

phase "Triton GPU tests: tests/test_triton.py -m gpu"
# Every candidate config last: about 20 kernel variants to compile, the least decisive.
from_source run_tests $(( $(left) - 320 )) 45 triton -m gpu \
    -k "not test_every_candidate_config and not test_lean_launch_gives_jit_run_bits" tests/test_triton.py
from_source run_tests $(( $(left) - 280 )) 20 triton-configs -m gpu -k test_every_candidate_config tests/test_triton.py

phase "host time by call path, the other GPU tests and fused-cuda, with the installed package"
wait_for_install
# After the install, so that the extension's family is timed too (not loaded from the source tree).
$PKG run_for $(( $(left) - 230 )) 10 "$LOGS/host-path.log" "$PY" bench/host_path.py
note "host time per step by call path (bench/host_path.py): status $? -> bench/results/$GPU-host-path.csv"
# The extension's own tests and the operators first; the backend matrix (about 190 CUDA cases) and
# the rest after them. Files only: a directory beside its own files drops or reorders them
# (pytest 8 collects only the files, pytest 9 sorts them into the directory's order).
GPU_TEST_FILES=(tests/test_cuda.py tests/test_ops.py tests/test_validation.py)
for file in tests/test_*.py; do
    [[ " ${GPU_TEST_FILES[*]} tests/test_triton.py " == *" $file "* ]] || GPU_TEST_FILES+=("$file")
done
$PKG run_tests $(( $(left) - 200 )) 70 gpu -m gpu "${GPU_TEST_FILES[@]}"
$PKG run_for $(( $(left) - 180 )) 20 "$LOGS/bench-bf16.log" "$PY" "${BENCH[@]}" --seconds 1 --n 4096 --modes fwd_bwd \
    --providers fused-cuda eager --dtypes bf16
note "fused-cuda bf16 N=4096 (checked against eager): status $?"

phase "N=1024 and 16384, every mode; IEEE fp32"
$PKG run_for $(( ($(left) - 90) / 2 )) 40 "$LOGS/bench-bf16.log" "$PY" "${BENCH[@]}" --seconds 0.5 --n 1024 16384 --dtypes bf16
note "bf16 N=1024, 16384: status $?"
$PKG run_for $(( $(left) - 90 )) 40 "$LOGS/bench-fp32-tf32.log" env TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1 \
    "$PY" "${BENCH[@]}" --seconds 0.5 --n 1024 16384 --dtypes fp32 --results bench/results/tf32
note "TF32 N=1024, 16384: status $?"
$PKG run_for $(( $(left) - 60 )) 25 "$LOGS/bench-fp32.log" "$PY" "${BENCH[@]}" --seconds 0.5 --n 4096 --dtypes fp32
note "IEEE fp32 N=4096 (the Triton backend runs 3xTF32): status $?"

phase "a whole training step: bench/atlop_step.py"
if [[ $DRY == 1 ]] || "$PY" -c "import transformers" 2>/dev/null; then
    # A first Triton compile in a new process hashes libtriton first: the third run's 40 s ran out there.
    $PKG run_for $(( $(left) - 60 )) 50 "$LOGS/atlop-step.log" "$PY" bench/atlop_step.py --steps 6 --seconds 2
    note "bench/atlop_step.py: status $? -> bench/results/$GPU-atlop-step.csv"
else
    note "bench/atlop_step.py: SKIPPED, transformers is not installed on this machine"
fi

phase "every Triton kernel's candidates alone; the model"
# bf16 from fp32 hs and ts (the benchmark's step since the third run) and TF32; bf16 from 16-bit
# inputs ran in the third run, and its sm_90 kernels compile to the same registers, shared memory
# and copies since (Triton 3.6; kind bf16 to time them again).
$PKG run_for $(( $(left) - 15 )) 50 "$LOGS/kernels.log" "$PY" bench/kernels.py --n 4096 --kinds bf16-amp tf32
note "bench/kernels.py: status $? -> bench/results/$GPU-kernels.csv"
$PKG run_for $(( $(left) - 5 )) 1 "$LOGS/kernels.log" "$PY" bench/roofline.py

phase "plots: bench/plot.py"
run_for $(( $(left) + 15 )) 5 "$LOGS/plot.log" "$PY" bench/plot.py bench/results/*.csv bench/results/tf32/*.csv

phase "summary"
for line in "${SUMMARY[@]}"; do echo "  $line"; done
for log in bench-bf16 bench-fp32-tf32 bench-fp32; do
    if grep -q "vs eager\|vs compiled" "$LOGS/$log.log" 2>/dev/null; then
        echo "  $log: fused providers against eager, compiled and gemm-bound (bench/run.py's summary):"
        grep "vs eager\|vs compiled" "$LOGS/$log.log" | sed 's/^/  /'
    fi
done
grep -h "per step" "$LOGS/step-profile.log" 2>/dev/null | sed 's/^/  /'
grep -h "^triton\|^extension" "$LOGS/host-path.log" 2>/dev/null | sed 's/^/  host path: /'
grep -h "of the step\|faster than eager" "$LOGS/atlop-step.log" 2>/dev/null | sed 's/^/  /'
echo "  total $(elapsed)s"

save_results
if [[ -n "${OUT:-}" && $DRY != 1 ]]; then
    echo "  copied the GPU CSVs, summary.txt and gpu-check.tar.gz (CSVs, plots, logs) to $OUT"
fi
