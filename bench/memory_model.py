#!/usr/bin/env python
"""Peak extra memory of a fused-triton forward + backward on an H100/H200, predicted without a
GPU: the step of bench/run.py (same inputs, fp32 leaves; bf16 under autocast) runs on CPU
tensors with the Triton backend configured as for an sm_90 GPU of 132 SMs (its tiles and forward
split, hence its buffers) and its launches replaced by no-ops, while every storage the step's
ops allocate is tracked from allocation to release. The most that is live at once is the
step's peak of requested bytes: a lower bound of what PyTorch's CUDA allocator reports as its
peak extra memory (bench/run.py's peak_mem_mib), which counts whole blocks, and a block over
1 MiB is not split for a remainder of 1 MiB or less: up to 1 MiB more per live tensor over
1 MiB, depending on what the process allocated before.

Checked against the H200's `make gpu-check` at fe98866 (bench/results/nvidia-h200.csv, and for
fp32 the TF32 rows of tf32/nvidia-h200.csv; the model's peaks are the same at either fp32
precision): a copy of this model adapted to that commit's backend interface gave 30.3, 48.2
and 138.2 MiB in bf16 (measured: 31.4, 48.2, 138.2) and 49.4, 73.2 and 238.3 MiB in fp32
(measured: 49.4, 74.2, 238.3) at N = 1024, 4096 and 16384: 0 to 1.1 MiB under. Repeat H200 runs
of one commit differed by 0.4 MiB. Eager's peak is not modelled: it is the unfused reference's,
which builds the [N, E*B] feature (H200: 302, 1179 and 4689 MiB in bf16).

    python bench/memory_model.py                 # bf16 and fp32, N = 1024 4096 16384

Rows go to bench/results/<this CPU>-as-sm90-memory.csv.
"""
import argparse
import contextlib
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_overhead  # noqa: E402  (before triton is imported: compiled kernels, not the interpreter)

import torch  # noqa: E402

import harness  # noqa: E402
import run  # noqa: E402

from ncrl_kernels import _op_autograd, functional  # noqa: E402
from ncrl_kernels.triton_kernels import backend  # noqa: E402

DEVICE = torch.device("cpu")
COLUMNS = ["provider", "dtype", "n_pairs", "emb", "block", "classes", "peak_mem_mib", "device", "commit", "timestamp"]


@contextlib.contextmanager
def eager_route():
    """Calls take the eager route, as on a GPU, though the tracker is a dispatch mode (under one,
    _op_autograd.dispatches_ops sends them to the registered operators, whose buffers the mode
    cannot see inside). Nothing in the modelled step works on ops (compile, tensor subclasses)."""
    dispatches_ops = _op_autograd.dispatches_ops
    _op_autograd.dispatches_ops = lambda args: False
    try:
        yield
    finally:
        _op_autograd.dispatches_ops = dispatches_ops


def fused_step(case):
    """bench/run.py's fused-triton provider (fused_ncrl with its defaults) past the dispatcher,
    which offers Triton on CUDA tensors only here: the same calls, validation aside."""
    return backend.fused(*case.params, case.labels, case.block, False, "ncrl", 0.0, True, "mean",
                         functional._autocast_dtype(DEVICE))[0]


def peak_mib(case, autocast_dtype):
    """The model's peak extra memory of one fused forward + backward of `case` (bench/run.py's
    fwd_bwd job), in MiB (call launch_overhead.pretend_gpu first, and stub the launches)."""
    setup, fn = run.loss_job(fused_step, case, "fwd_bwd", DEVICE, autocast_dtype)
    fn(setup())  # what a first call sets up (cached configs) is not the step's
    state = setup()
    tracker = harness.LiveStorages([*case.params, case.labels])
    with eager_route(), tracker:
        fn(state)
    return tracker.peak / 2**20


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtypes", nargs="+", choices=sorted(run.DTYPES), default=["bf16", "fp32"])
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--classes", type=int, default=97)
    p.add_argument("--results", default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    launch_overhead.pretend_gpu()
    commit, stamp = harness.git_commit(), harness.timestamp()
    rows = []
    with harness.triton_launches_through(harness.NoLaunch):
        for dtype in args.dtypes:
            for n in args.n:
                case = run.make_case(n, args.emb, args.block, args.classes, DEVICE)
                mib = peak_mib(case, None if dtype == "fp32" else run.DTYPES[dtype])
                print(f"fused-triton {dtype:5s} N={n:6d}  peak extra memory {mib:7.1f} MiB (predicted, sm_90)")
                rows.append(dict(provider="fused-triton", dtype=dtype, n_pairs=n, emb=args.emb, block=args.block,
                                 classes=args.classes, peak_mem_mib=round(mib, 1),
                                 device=f"{harness.device_name(DEVICE)}-as-sm{launch_overhead.TARGET.arch}",
                                 commit=commit, timestamp=stamp))
    path = harness.append_rows(rows, DEVICE, args.results, suffix="-as-sm90-memory", columns=COLUMNS)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
