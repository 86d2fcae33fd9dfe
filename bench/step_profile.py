#!/usr/bin/env python
"""Where the time of one fused forward + backward goes on a GPU: torch.profiler over a few steps
of bench/run.py's case, the GPU time of each kernel, and the step's wall time with and without
waiting for the GPU (the gap is Python and launch overhead that a training step overlaps with
the encoder's GPU work). For the Triton provider also the host's time from a step's start to the
weight grad's launch: a step bound by the host ends about that long plus the gradient kernels'
GPU time after its start (docs/triton.md, "Where the time goes").

    python bench/step_profile.py --n 4096 --dtype bf16
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import run  # noqa: E402


def host_to_weight_grad_launch(once, steps, device):
    """Mean host time in ms from the start of `once` (a Triton step) to its weight grad's launch,
    and of the whole step, each step started with `device` idle."""
    from ncrl_kernels.triton_kernels import _launch, head_backward

    marks = []

    class Marking:
        """The backend's launcher, noting when the weight grad's launch is issued."""

        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            if self.kernel is head_backward.weight_grad_kernel:
                marks.append(time.perf_counter())
            return _launch.launcher(self.kernel)[grid]

    to_launch = whole = 0.0
    with harness.triton_launches_through(Marking):
        for _ in range(steps):
            harness.synchronize(device)
            del marks[:]
            start = time.perf_counter()
            once()
            whole += time.perf_counter() - start
            to_launch += marks[0] - start
    harness.synchronize(device)
    return to_launch * 1e3 / steps, whole * 1e3 / steps


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--dtype", choices=sorted(run.DTYPES), default="bf16")
    p.add_argument("--provider", default="fused-triton")
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)
    device = torch.device("cuda")
    case = run.make_case(args.n, 768, 64, 97, device)
    dtype = run.DTYPES[args.dtype]
    autocast = torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32)
    step = run.make_step(args.provider)

    def once():
        for param in case.params:
            param.grad = None
        with autocast:
            loss = step(case)
        loss.backward()

    for _ in range(3):
        once()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(args.steps):
        once()
    host_ms = (time.perf_counter() - start) * 1e3 / args.steps
    torch.cuda.synchronize()
    queued_ms = (time.perf_counter() - start) * 1e3 / args.steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(args.steps):
            once()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_time_total > 0]
    total_us = sum(e.device_time_total for e in events) / args.steps
    print(f"{args.provider} {args.dtype} N={args.n}: {queued_ms:.3f} ms per step back to back, CPU side "
          f"{host_ms:.3f} ms, GPU kernels {total_us / 1e3:.3f} ms")
    for e in sorted(events, key=lambda e: -e.device_time_total)[:12]:
        print(f"  {e.device_time_total / args.steps / 1e3:8.3f} ms  x{e.count // args.steps:<3d} {e.key[:90]}")
    if args.provider.startswith("fused-triton"):
        to_launch, whole = host_to_weight_grad_launch(once, args.steps, device)
        print(f"host to the weight grad's launch {to_launch:.3f} ms of {whole:.3f} ms host per step (each step "
              "started with the GPU idle)")
        # The model behind docs/triton.md's predictions: a host-bound step ends when the gradient
        # kernels, launched back to back from that point, are done.
        gradients = [e for e in events if "weight_grad_kernel" in e.key or "input_grad_kernel" in e.key]
        gradients_ms = sum(e.device_time_total for e in gradients) / args.steps / 1e3
        if len(gradients) == 2:
            print(f"model: {to_launch:.3f} + {gradients_ms:.3f} ms of gradient kernels = "
                  f"{to_launch + gradients_ms:.3f} ms per step, against {queued_ms:.3f} ms measured back to back")
        else:
            print(f"model: the profile has {len(gradients)} events named like the two gradient kernels, not 2")


if __name__ == "__main__":
    main()
