#!/usr/bin/env python
"""What issuing one fused forward + backward costs the host (CPU time, kernels aside), and through
which layer: at DocRED's sizes a GPU runs the step's kernels faster than Python issues them
(docs/triton.md, "Where the time goes"), so this is the step's wall time there.

Each backend family is called three ways, same arguments, same kernels:

- ``api``: ``ncrl_kernels.fused_ncrl`` (validation, dispatch, then the next row's path);
- ``function``: the family's ``torch.autograd.Function``, which eager calls take;
- ``operator``: the family's registered ``torch.library`` operator with its registered autograd,
  which torch.compile traces (and which eager calls took before the Functions).

On a GPU the kernels launch for real at N=1024 (less GPU work than host work, so the loop, which
does not wait for the GPU, measures the host), and the Triton family's ``function`` path is timed
twice more: with its launches replaced by no-ops (``stubbed``; the difference is what launching
costs that host for a step's launches) and with every launch through Triton's ``JITFunction.run``
(``jit_run``) instead of the backend's ``LeanLaunch`` (the difference is what LeanLaunch saves;
bench/launch_overhead.py measures both without a GPU). On a CPU, the Triton family runs with its launches
replaced by no-ops (under TRITON_INTERPRET=1, which this script sets; wrap_triton's tracing path,
which eager launches skip on a GPU too, is never taken there: test_eager_calls_launch_directly
checks the GPU route) and the C++ family runs its kernels at a tiny shape; the host path does
not depend on the shape. ``launches`` counts the Triton launches of a step (CPU only).

    python bench/host_path.py            # CUDA if available, else CPU

Rows go to bench/results/<device>-host-path.csv.
"""
import argparse
import contextlib
import os
import sys

import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEVICE.type == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported (by ncrl_kernels)

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import ncrl_kernels  # noqa: E402
from ncrl_kernels import _dispatch  # noqa: E402

COLUMNS = ["family", "path", "dtype", "n_pairs", "emb", "block", "classes", "host_us_p50", "host_us_p20",
           "host_us_p80", "launches", "device", "commit", "timestamp"]
PATHS = ("api", "function", "operator")


def family_of(backend):
    """The OpFamily of `backend`'s module."""
    return _dispatch.resolve(backend, DEVICE)._FAMILY


def make_step(backend, path, inputs, block, extra):
    hs, ts, weight, bias, labels = inputs
    family = family_of(backend)
    args = (hs, ts, weight, bias, labels, block, False, "ncrl", 0.0, True, "mean", *extra)
    if path == "api":
        def forward():
            return ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=block, backend=backend)
    elif path == "function":
        def forward():
            return family.function("fused_forward", *args)[0]
    else:
        def forward():
            return family.ops["fused_forward"](*args)[0]

    def step():
        for x in (hs, ts, weight, bias):
            x.grad = None
        forward().backward()
    return step


def cases():
    """(family, backend, dtype, shape) measured on this device."""
    if DEVICE.type == "cuda":  # the C++/CUDA ops are the "extension" family on either device
        families = (("triton", "triton"), ("extension", "cuda"))
        return [(family, backend, dtype, (1024, 768, 64, 97)) for family, backend in families
                for dtype in (torch.bfloat16, torch.float32) if backend in ncrl_kernels.available_backends(DEVICE)]
    found = []
    if "triton" in ncrl_kernels.available_backends(DEVICE):
        # Launches stubbed: any size; fp16, as the interpreter's backend refuses bf16 heads.
        found.append(("triton", "triton", torch.float16, (64, 768, 64, 97)))
    if "cpp" in ncrl_kernels.available_backends(DEVICE):
        found.append(("extension", "cpp", torch.float32, (8, 64, 8, 97)))  # real kernels: a tiny shape
    return found


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--results", default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    with harness.triton_launches_through(harness.NoLaunch) if DEVICE.type == "cpu" else contextlib.nullcontext():
        measure(args)


def paths(family):
    """(row name, path, launcher) timed for `family` on this device: the path's launches go
    through `launcher` (None: the backend's own). Where the backend's own launches take
    JITFunction.run (NCRL_KERNELS_LEAN_LAUNCH=0), the Triton rows say so ("-jit") and there is no
    separate jit_run row."""
    if DEVICE.type == "cuda" and family == "triton":
        suffix = harness.triton_launch_suffix()
        return ([(path + suffix, path, None) for path in PATHS] + [("stubbed", "function", harness.NoLaunch)]
                + ([] if suffix else [("jit_run", "function", lambda kernel: kernel)]))
    return [(path, path, None) for path in PATHS]


def measure(args):
    name, commit, stamp = harness.device_name(DEVICE), harness.git_commit(), harness.timestamp()
    rows = []
    print(f"{'family':<10} {'path':<9} {'dtype':<9} {'N':>5}  {'host us/step (p20-p80)':>24}  launches")
    for family, backend, dtype, (n, emb, block, classes) in cases():
        hs = torch.randn(n, emb, device=DEVICE, dtype=dtype, requires_grad=True)
        ts = torch.randn(n, emb, device=DEVICE, dtype=dtype, requires_grad=True)
        weight = torch.randn(classes, emb * block, device=DEVICE, dtype=dtype).mul_(0.01).requires_grad_()
        bias = torch.zeros(classes, device=DEVICE, requires_grad=True)
        labels = torch.zeros(n, classes, device=DEVICE)
        labels[:, 0] = 1
        extra = (ncrl_kernels.triton_kernels.backend.precision_for(dtype),) if family == "triton" else ()
        for row_name, path, launcher in paths(family):
            step = make_step(backend, path, (hs, ts, weight, bias, labels), block, extra)
            with harness.triton_launches_through(launcher) if launcher else contextlib.nullcontext():
                p50, p20, p80 = harness.host_us(DEVICE, step, args.steps, args.repeats)
                harness.NoLaunch.launches = 0
                step()
            stubbed = launcher is harness.NoLaunch or (family == "triton" and DEVICE.type == "cpu")
            launches = harness.NoLaunch.launches if stubbed else ""
            dtype_name = str(dtype).removeprefix("torch.")
            print(f"{family:<10} {row_name:<9} {dtype_name:<9} {n:>5}  {f'{p50:.0f} ({p20:.0f}-{p80:.0f})':>24}  "
                  f"{launches:>8}")
            rows.append(dict(family=family, path=row_name, dtype=dtype_name, n_pairs=n, emb=emb, block=block,
                             classes=classes, host_us_p50=round(p50, 1), host_us_p20=round(p20, 1),
                             host_us_p80=round(p80, 1), launches=launches, device=name, commit=commit,
                             timestamp=stamp))
    path = harness.append_rows(rows, DEVICE, args.results, suffix="-host-path", columns=COLUMNS)
    print(f"rows appended to {path}")


if __name__ == "__main__":
    main()
