#!/usr/bin/env python
"""What launching the Triton kernels costs the host, without a GPU: the kernels are compiled for
sm_90 as on an H100/H200 (Triton's driver is replaced by a pretend one), and the compiled
kernels' C launcher, the one piece that needs a GPU, by a recorder that runs nothing.

Checks first that ``_launch.LeanLaunch`` calls the C launcher with the arguments that Triton's
``JITFunction.run`` passes it for the same launch (grid, stream, the compiled kernel's handle,
metadata, hooks, every argument by identity; not the launch metadata, which only launch hooks
read and LeanLaunch leaves to JITFunction.run while one is set), and takes JITFunction.run for a
key's first launch only: every launch of a forward + backward both ways, twice, fused in each
dtype, and in a few other cases (``CHECK_CASES``: the head and the losses alone, symmetric, no
bias, an unaligned input; Triton's debug mode, a launch hook, another device); exits 1 if not.
Then times one bf16 fused forward + backward through the family's autograd.Function (as
bench/host_path.py's ``function`` path) three ways, interleaved:

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
import contextlib
import functools
import os
import statistics
import sys

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels: before triton is imported
os.environ.pop("NCRL_KERNELS_LEAN_LAUNCH", None)  # LeanLaunch is what is checked and timed

import torch  # noqa: E402
import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler.compiler import CompiledKernel  # noqa: E402
from triton.runtime.driver import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

from ncrl_kernels.triton_kernels import _common, _launch, backend  # noqa: E402

DEVICE = torch.device("cpu")
COLUMNS = ["launch", "dtype", "n_pairs", "emb", "block", "classes", "host_us_p50", "host_us_p20", "host_us_p80",
           "launches", "us_per_launch", "triton", "device", "commit", "timestamp"]
TARGET = GPUTarget("cuda", 90, 32)  # an H100/H200
STREAM = 7


class PretendDriver:
    """The part of Triton's active driver that JITFunction.run and LeanLaunch ask: the current
    device (0, or another while a check case says so), all TARGETs, one stream."""

    device = 0

    def get_current_device(self):
        return PretendDriver.device

    def get_current_stream(self, device):
        return STREAM

    def get_current_target(self):
        return TARGET


CALLS = None  # what the C launcher was called with, while recording (a list)
LAUNCH_METADATA = 6  # its position in a C launcher call: only launch hooks read it


def record_launch(*args):
    if CALLS is not None:
        CALLS.append(args)


def load_nothing(kernel):
    """CompiledKernel._init_handles without a GPU: a handle unique to the compiled kernel (each
    device has its own), the recorder as its C launcher."""
    kernel.module, kernel.function, kernel._run = object(), f"{kernel.name} {kernel.hash} {id(kernel)}", record_launch


def pretend_gpu():
    """Everything from here on compiles for TARGET and launches into the recorder."""
    driver.set_active(PretendDriver())
    CompiledKernel._init_handles = load_nothing
    _common.cuda_index = lambda device: 0
    _common.cuda_capability = lambda index: (TARGET.arch // 10, TARGET.arch % 10)
    _common.multiprocessors = lambda index: 132


def make_step(dtype, n=64, emb=768, block=64, classes=97, op="fused", symmetric=False, loss="ncrl",
              reduction="mean", bias=True, aligned=True):
    """A forward + backward of one of the family's autograd.Functions (`op`: "fused", "head" or
    "loss") on CPU tensors; hs and ts 16-byte aligned or not (views one element into their
    storage)."""
    hs, ts = (torch.randn(n * emb + 1, dtype=dtype)[1 - aligned:][:n * emb].view(n, emb).requires_grad_()
              for _ in range(2))
    weight = torch.randn(classes, emb * block, dtype=dtype).mul_(0.01).requires_grad_()
    bias = torch.zeros(classes, requires_grad=True) if bias else None
    logits = torch.randn(n, classes, requires_grad=True)
    labels = torch.zeros(n, classes)
    labels[:, 0] = 1
    function, precision = backend._FAMILY.function, _common.precision_for(dtype)
    calls = {
        "fused": lambda: function("fused_forward", hs, ts, weight, bias, labels, block, symmetric, loss, 0.0, True,
                                  reduction, precision)[0],
        "head": lambda: function("head_forward", hs, ts, weight, bias, block, symmetric, precision).float(),
        "loss": lambda: function("loss_forward", logits, labels, loss, 0.0, True, reduction)[0],
    }

    def step():
        for x in (hs, ts, weight, bias, logits):
            if x is not None:
                x.grad = None
        calls[op]().sum().backward()
    return step, (n, emb, block, classes)


class BothRoutes:
    """A launcher for the check: each launch goes through JITFunction.run, then through the
    kernel's LeanLaunch, each into the recorder; `mismatches` counts launches where the two
    recorded calls differ (every argument by identity, but the launch metadata), `jit_runs` the
    LeanLaunches that took JITFunction.run (each key's first)."""

    mismatches = launches = jit_runs = 0

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **constants):
            global CALLS
            CALLS = []
            self.kernel[grid](*args, **constants)
            (expected,), CALLS = CALLS, []
            with counting_jit_runs() as jit_runs:
                _launch.launcher(self.kernel)[grid](*args, **constants)
            (lean,), CALLS = CALLS, None
            same = len(lean) == len(expected) and all(
                i == LAUNCH_METADATA or (a is b if isinstance(a, torch.Tensor) else a == b)
                for i, (a, b) in enumerate(zip(lean, expected)))
            BothRoutes.launches += 1
            BothRoutes.mismatches += not same
            BothRoutes.jit_runs += jit_runs[0]
        return launch


@contextlib.contextmanager
def counting_jit_runs():
    """Counts the calls of JITFunction.run while inside."""
    count, run = [0], JITFunction.run

    def counted(self, *args, **kwargs):
        count[0] += 1
        return run(self, *args, **kwargs)
    JITFunction.run = counted
    try:
        yield count
    finally:
        JITFunction.run = run


CHECK_CASES = [dict(dtype=dtype) for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64)] + [
    dict(dtype=torch.bfloat16, bias=False), dict(dtype=torch.bfloat16, aligned=False),
    dict(dtype=torch.bfloat16, symmetric=True, loss="atl"), dict(dtype=torch.float32, op="head", symmetric=True),
    dict(dtype=torch.float32, op="loss", loss="bce", reduction="none"),
    dict(dtype=torch.bfloat16, setting="debug"), dict(dtype=torch.bfloat16, setting="hook"),
    dict(dtype=torch.bfloat16, setting="device 1")]


@contextlib.contextmanager
def triton_setting(setting):
    """While inside: Triton's debug mode on ("debug"), a launch hook that does nothing set
    ("hook"), or the pretend driver's device 1 current ("device 1"); nothing for None."""
    runtime = knobs.runtime
    previous = runtime.debug, PretendDriver.device

    def hook(metadata):
        pass
    runtime.debug = setting == "debug"
    PretendDriver.device = 1 if setting == "device 1" else 0
    if setting == "hook":
        runtime.launch_enter_hook.add(hook)
    try:
        yield
    finally:
        runtime.debug, PretendDriver.device = previous
        runtime.launch_enter_hook.remove(hook)


def check():
    """Whether LeanLaunch calls the C launcher as JITFunction.run does, and takes JITFunction.run
    for a key's first launch only (for every launch while a hook is set): each case's step twice,
    every launch both ways."""
    ok = True
    for case in CHECK_CASES:
        case = dict(case)
        setting = case.pop("setting", None)
        step, _ = make_step(**case)
        per_step = 1 if case.get("op") == "loss" else 4
        BothRoutes.mismatches = BothRoutes.launches = BothRoutes.jit_runs = 0
        with harness.triton_launches_through(BothRoutes), triton_setting(setting):
            step()
            first_jit_runs = BothRoutes.jit_runs
            step()
        second_jit_runs = BothRoutes.jit_runs - first_jit_runs
        good = (BothRoutes.mismatches == 0 and BothRoutes.launches == 2 * per_step
                and second_jit_runs == (per_step if setting == "hook" else 0))
        ok &= good
        name = ", ".join(f"{k}={str(v).removeprefix('torch.')}" for k, v in case.items())
        name += f", {setting}" if setting else ""
        fast = BothRoutes.launches - BothRoutes.jit_runs
        print(f"{name:<48} {BothRoutes.launches} launches, {fast} through LeanLaunch's fast path: "
              f"{'LeanLaunch passes the same arguments' if good else 'DIFFERENT or the wrong path'}")
    return ok


def measure(args):
    """Host time per step of each route, the routes interleaved (one batch of steps each per
    round, `repeats` rounds, each route first in turn), so that drift and order effects on this
    noisy machine hit them alike."""
    step, (n, emb, block, classes) = make_step(torch.bfloat16)
    routes = {"stubbed": harness.NoLaunch, "jit_run": lambda kernel: kernel, "lean": _launch.launcher}

    def batch_through(launcher):
        with harness.triton_launches_through(launcher):
            return harness.batch_us(DEVICE, step, args.steps)

    times = harness.interleaved({name: functools.partial(batch_through, launcher) for name, launcher in routes.items()},
                                min_rounds=args.repeats)
    commit, stamp = harness.git_commit(), harness.timestamp()
    rows = []
    for name, values in times.items():
        p50, p20, p80 = harness.spread(values)
        per_launch = "" if name == "stubbed" else round((p50 - statistics.median(times["stubbed"])) / 4, 1)
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
    p.add_argument("--repeats", type=int, default=15)
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
