#!/usr/bin/env python
"""What launching the Triton kernels costs the host, without a GPU: the kernels are compiled for
sm_90 as on an H100/H200 (Triton's driver is replaced by a pretend one), and the compiled
kernels' C launcher, the one piece that needs a GPU, by a recorder that runs nothing.

Checks first that ``_launch.LeanLaunch`` calls the C launcher with the arguments that Triton's
``JITFunction.run`` passes it for the same launch (grid, stream, kernel handle, metadata, hooks,
every argument; not the launch metadata, which only launch hooks read and LeanLaunch leaves to
JITFunction.run while one is set), over a fused forward + backward in each dtype; exits 1 if not.
Then times one bf16 fused forward + backward through the family's autograd.Function (as
bench/host_path.py's ``function`` path) three ways:

- ``stubbed``: the launch sites call nothing (bench/host_path.py's CPU rows);
- ``jit_run``: every launch through ``JITFunction.run`` (what the backend did before LeanLaunch);
- ``lean``: the backend's launches (LeanLaunch).

The difference from ``stubbed``, over the step's 4 launches, is the Python cost of a launch on
this host; a GPU adds the C launcher's own time to both launch paths (bench/host_path.py's
``stubbed`` path measures it there).

    python bench/launch_overhead.py

Rows go to bench/results/<device>-launch.csv.
"""
import argparse
import os
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: before triton is imported

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from ncrl_kernels.triton_kernels import _common, _launch, backend  # noqa: E402

DEVICE = torch.device("cpu")
COLUMNS = ["launch", "dtype", "n_pairs", "emb", "block", "classes", "host_us_p50", "host_us_p20", "host_us_p80",
           "launches", "us_per_launch", "triton", "device", "commit", "timestamp"]
TARGET = GPUTarget("cuda", 90, 32)  # an H100/H200
STREAM = 7


class PretendDriver:
    """The part of Triton's active driver that JITFunction.run and LeanLaunch ask: device 0 of
    TARGET, one stream."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device):
        return STREAM

    def get_current_target(self):
        return TARGET


CALLS = []  # what the C launcher was called with, while recording (calls_of)
RECORDING = [False]


def record_launch(*args):
    if RECORDING[0]:
        CALLS.append(args)


def load_nothing(kernel):
    """CompiledKernel._init_handles without a GPU: a handle that names the kernel, the recorder
    as its C launcher."""
    kernel.module, kernel.function, kernel._run = object(), f"handle of {kernel.name}", record_launch


def pretend_gpu():
    """Everything from here on compiles for TARGET and launches into the recorder."""
    driver.set_active(PretendDriver())
    CompiledKernel._init_handles = load_nothing
    _common.cuda_index = lambda device: 0
    _common.cuda_capability = lambda index: (TARGET.arch // 10, TARGET.arch % 10)
    _common.multiprocessors = lambda index: 132


def fused_step(dtype, n=64, emb=768, block=64, classes=97):
    """A fused NCRL forward + backward through the family's autograd.Function, on CPU tensors."""
    hs, ts = (torch.randn(n, emb, dtype=dtype, requires_grad=True) for _ in range(2))
    weight = torch.randn(classes, emb * block, dtype=dtype).mul_(0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True)
    labels = torch.zeros(n, classes)
    labels[:, 0] = 1
    fused = backend._FAMILY.functions["fused_forward"]
    args = (hs, ts, weight, bias, labels, block, False, "ncrl", 0.0, True, "mean", _common.precision_for(dtype))

    def step():
        for x in (hs, ts, weight, bias):
            x.grad = None
        fused.apply(*args)[0].backward()
    return step, (n, emb, block, classes)


def comparable(call):
    """A C launcher call without its launch metadata (position 6), tensors by layout."""
    return [(a.dtype, tuple(a.shape), a.stride()) if isinstance(a, torch.Tensor) else a
            for i, a in enumerate(call) if i != 6]


def calls_of(step):
    CALLS.clear()
    RECORDING[0] = True
    try:
        step()
    finally:
        RECORDING[0] = False
    return [comparable(call) for call in CALLS]


def check():
    """Whether LeanLaunch and JITFunction.run call the C launcher alike, in every dtype."""
    same = True
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        step, _ = fused_step(dtype)
        with harness.triton_launches_through(lambda kernel: kernel):
            expected = calls_of(step)
        calls_of(step)  # each config's first LeanLaunch goes through JITFunction.run
        lean = calls_of(step)
        ok = len(expected) == 4 and lean == expected
        same &= ok
        print(f"{str(dtype).removeprefix('torch.'):<9} {len(expected)} launches: "
              f"{'LeanLaunch passes the same arguments' if ok else 'DIFFERENT ARGUMENTS'}")
    return same


def measure(args):
    step, (n, emb, block, classes) = fused_step(torch.bfloat16)
    routes = {"stubbed": harness.NoLaunch, "jit_run": lambda kernel: kernel, "lean": _launch.launcher}
    times = {}
    for name, launcher in routes.items():
        with harness.triton_launches_through(launcher):
            times[name] = harness.host_us(DEVICE, step, args.steps, args.repeats)
    commit, stamp = harness.git_commit(), harness.timestamp()
    rows = []
    for name, (p50, p20, p80) in times.items():
        per_launch = "" if name == "stubbed" else round((p50 - times["stubbed"][0]) / 4, 1)
        print(f"{name:<8} {p50:6.0f} us/step ({p20:.0f}-{p80:.0f})  {per_launch} us per launch over stubbed")
        rows.append(dict(launch=name, dtype="bfloat16", n_pairs=n, emb=emb, block=block, classes=classes,
                         host_us_p50=round(p50, 1), host_us_p20=round(p20, 1), host_us_p80=round(p80, 1),
                         launches=4, us_per_launch=per_launch, triton=triton.__version__,
                         device=f"{harness.device_name(DEVICE)}-as-sm{TARGET.arch}", commit=commit,
                         timestamp=stamp))
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--results", default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    pretend_gpu()
    if not check():
        return 1
    rows = measure(args)
    path = harness.append_rows(rows, DEVICE, args.results, suffix="-launch", columns=COLUMNS)
    print(f"rows appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
