#!/usr/bin/env python
"""Peak extra memory of a fused-triton forward + backward on an H100/H200, predicted without a
GPU: the step of bench/run.py (same inputs, fp32 leaves; bf16 under autocast) runs on CPU
tensors with the Triton backend configured as for an sm_90 GPU of 132 SMs (its tiles and forward
split, hence its buffers) and its launches replaced by no-ops, while every storage the step's
ops allocate is tracked from allocation to release. The most that is live at once is what
PyTorch's CUDA allocator reports as the step's peak extra memory (bench/run.py's peak_mem_mib),
up to the allocator's rounding to 512-byte blocks.

Checked against the H200's `make gpu-check` at fe98866 (bench/results/nvidia-h200.csv and
tf32/nvidia-h200.csv), this model run at that commit gave 30.3, 48.2 and 138.2 MiB in bf16
(measured: 31, 48, 138) and 49.4, 73.2 and 238.3 MiB in fp32 (measured: 49, 74, 238) at
N = 1024, 4096 and 16384. Eager's peak is not modelled: it is the unfused reference's, which
builds the [N, E*B] feature (H200: 302, 1179 and 4689 MiB in bf16).

    python bench/memory_model.py                 # bf16 and fp32, N = 1024 4096 16384

Rows go to bench/results/<this CPU>-as-sm90-memory.csv.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import launch_overhead  # noqa: E402  (before triton is imported: compiled kernels, not the interpreter)

import torch  # noqa: E402

import harness  # noqa: E402
import run  # noqa: E402

from ncrl_kernels import _op_autograd  # noqa: E402
from ncrl_kernels.triton_kernels import backend  # noqa: E402

DEVICE = torch.device("cpu")
COLUMNS = ["provider", "dtype", "n_pairs", "emb", "block", "classes", "peak_mem_mib", "device", "commit", "timestamp"]


def peak_mib(case, autocast_dtype):
    """The model's peak extra memory of one fused forward + backward of `case`, in MiB."""
    def step():
        for p in case.params:
            p.grad = None
        with torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None):
            value = backend.fused(*case.params, case.labels, case.block, False, "ncrl", 0.0, True, "mean",
                                  autocast_dtype)[0]
        value.backward()

    step()  # what a first call sets up (cached configs) is not the step's
    tracker = harness.LiveStorages([*case.params, case.labels])
    with tracker:
        step()
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
    # Nothing here works on ops (compile, subclasses): without this, the tracker's own dispatch
    # mode would send the calls to the registered operators instead of the eager route.
    _op_autograd.dispatches_ops = lambda args: False
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
