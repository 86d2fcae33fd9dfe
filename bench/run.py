#!/usr/bin/env python
"""The main benchmark (`make bench`): ATLOP's head + NCRL loss, DocRED-shaped (E=768, B=64, C=97).

Every fused backend available on the device against the unfused eager reference (ATLOP's code
path: the [N, E*B] feature is built) and torch.compile of it, plus `gemm-bound` (the three GEMMs
of forward, dW and dX on a pre-built feature: the floor for the same FLOPs, not a usable method).
Modes: fwd (training forward), bwd (backward of a finished forward), fwd_bwd. Prints a table,
checks every provider's loss against eager's, and appends rows to bench/results/<device>.csv.

    python bench/run.py                       # CPU defaults: N = 512 2048 4096, fp32, + N=16384 fused
    python bench/run.py --device cuda --n 1024 4096 16384 --dtypes fp32 bf16
    python bench/run.py --n 4096 --dtypes bf16 --modes fwd_bwd --cuda-graphs   # + GPU time alone

With --cuda-graphs (CUDA), each provider's fwd_bwd step is also captured whole in a CUDA graph and
replayed (rows "<provider>+graph"): its GPU time without the host's, which a benchmark that waits
for every step otherwise measures where the host is slower than the GPU (docs/triton.md).
"""
import argparse
import concurrent.futures
import contextlib
import dataclasses
import math
import multiprocessing
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import ncrl_kernels  # noqa: E402
from ncrl_kernels import _dispatch  # noqa: E402

KERNEL = "group_bilinear_ncrl"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("fwd", "bwd", "fwd_bwd")
# DocRED: ~97% of entity pairs have no relation; the rest have one or two.
POSITIVE_PAIR_RATE = 0.03


@dataclasses.dataclass
class Case:
    hs: torch.Tensor
    ts: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor
    labels: torch.Tensor
    block: int

    @property
    def params(self):
        return (self.hs, self.ts, self.weight, self.bias)


def make_case(n, emb, block, classes, device, seed=0):
    """fp32 leaves (as ATLOP's parameters and tanh outputs are); bf16 runs under autocast."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.rand(n, emb, generator=g) * 2 - 1
    ts = torch.rand(n, emb, generator=g) * 2 - 1
    bound = 1 / math.sqrt(emb * block)  # nn.Linear's init range
    weight = (torch.rand(classes, emb * block, generator=g) * 2 - 1) * bound
    bias = (torch.rand(classes, generator=g) * 2 - 1) * bound
    labels = torch.zeros(n, classes)
    positive = torch.rand(n, generator=g) < POSITIVE_PAIR_RATE
    labels[positive, torch.randint(1, classes, (n,), generator=g)[positive]] = 1.0
    labels[:, 0] = (~positive).float()
    leaf = lambda x: x.to(device).requires_grad_()  # noqa: E731
    return Case(leaf(hs), leaf(ts), leaf(weight), leaf(bias), labels.to(device), block)


def loss_provider(backend, compiled=False):
    def step(hs, ts, weight, bias, labels, block):
        return ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=block, backend=backend)

    if compiled:
        step = torch.compile(step, dynamic=False)
    return lambda case: step(*case.params, case.labels, case.block)


# Every provider name; providers_for(device) lists those that can run there.
PROVIDERS = ("eager", "compiled", "gemm-bound", *(f"fused-{b}" for b in _dispatch.BACKENDS if b != "reference"))


def providers_for(device):
    names = ["eager", "compiled", "gemm-bound"]
    for backend in ncrl_kernels.available_backends(device):
        # The Triton interpreter (TRITON_INTERPRET=1 on a CPU) is a debugging tool, not a provider.
        if backend != "reference" and not (backend == "triton" and device.type == "cpu"):
            names.append(f"fused-{backend}")
    return names


def recorded_name(provider):
    """The provider's name in the rows: 'fused-triton-jit' for fused-triton launched through
    Triton's JITFunction.run (harness.triton_launch_suffix)."""
    if provider.removesuffix(harness.GRAPH) == "fused-triton":
        return provider.replace("fused-triton", "fused-triton" + harness.triton_launch_suffix())
    return provider


def make_step(provider):
    if provider == "eager":
        return loss_provider("reference")
    if provider == "compiled":
        return loss_provider("reference", compiled=True)
    return loss_provider(provider.removeprefix("fused-"))


def loss_job(step, case, mode, device, autocast_dtype):
    """(setup, fn) of one measurement of a loss provider: fn(setup()) runs `mode` once."""
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    def clear():
        for p in case.params:
            p.grad = None

    def forward():
        with autocast():
            return step(case)

    if mode == "fwd":
        return clear, lambda _: forward()
    if mode == "bwd":
        return (lambda: (clear(), forward())[1]), (lambda loss: loss.backward())
    return clear, lambda _: forward().backward()


def gemm_bound_job(case, mode, device, dtype):
    """The three GEMMs of the head on a pre-built [N, E*B] feature, in the compute dtype."""
    n, emb = case.hs.shape
    with torch.no_grad():
        feats = (case.hs.view(n, -1, case.block, 1) * case.ts.view(n, -1, 1, case.block)).reshape(n, -1).to(dtype)
        weight = case.weight.detach().to(dtype)
        grad = torch.randn(n, weight.shape[0], device=device, dtype=dtype)

    @torch.no_grad()
    def fn(_):
        if mode in ("fwd", "fwd_bwd"):
            feats @ weight.T
        if mode in ("bwd", "fwd_bwd"):
            grad.T @ feats  # d weight
            grad @ weight  # d feature

    return None, fn


def refused_providers(case, providers, device, autocast_dtype):
    """{provider: why} for each provider whose loss differs from eager's, or whose step fails: its
    time would mean nothing. Eager's own failure stops the run (nothing could be checked). With
    autograd on, as the timed steps run: under no_grad, torch.compile compiled the check a graph
    of its own, a second cold compile before the first timed row."""
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext
    values, refused = {}, {}
    for name, step in providers.items():
        try:
            with autocast():
                values[name] = step(case).item()
        except Exception as error:  # one broken provider must not cost the others' rows
            if name == "eager":
                raise
            refused[name] = f"failed: {type(error).__name__}: {error}"
    rtol = 2e-2 if autocast_dtype else 1e-3
    for name, value in values.items():
        if not math.isclose(value, values["eager"], rel_tol=rtol):
            refused[name] = f"loss {value:.6f} != eager {values['eager']:.6f} (rtol {rtol})"
    return refused


def jobs(args, device, providers, steps, refused=None):
    """Every measurement as ((dtype, n, mode, provider), (setup, fn)), case by case. With a dict
    `refused`, each case's providers are first checked against eager (refused_providers); those
    refused are recorded there, keyed by (dtype, n, provider), and skipped."""
    cases = [(n, providers) for n in args.n]
    if args.large_n:
        cases.append((args.large_n, [p for p in providers if p.startswith("fused-")]))
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        autocast_dtype = None if dtype == torch.float32 else dtype
        for n, names in cases:
            case = make_case(n, args.emb, args.block, args.classes, device)
            if refused is not None and "eager" in names:
                for name, why in refused_providers(case, {p: steps[p] for p in names if p in steps}, device,
                                                   autocast_dtype).items():
                    print(f"  {dtype_name:5s} N={n:6d} {name}: {why}: not benchmarked", flush=True)
                    refused[dtype_name, n, name] = why
                names = [p for p in names if (dtype_name, n, p) not in refused]
            fwd_bwd_jobs = {}
            for mode in (args.modes if n != args.large_n else ["fwd_bwd"]):
                for provider in names:
                    job = (gemm_bound_job(case, mode, device, dtype) if provider == "gemm-bound"
                           else loss_job(steps[provider], case, mode, device, autocast_dtype))
                    if mode == "fwd_bwd":
                        fwd_bwd_jobs[provider] = job
                    yield (dtype_name, n, mode, provider), job
            # After every plain row of the case: a capture that fails cannot upset those.
            if args.cuda_graphs:
                for provider, (setup, fn) in fwd_bwd_jobs.items():
                    graphed = harness.GraphedStep(fn, setup, device)
                    yield (dtype_name, n, "fwd_bwd", provider + harness.GRAPH), (None, graphed)
            del case, fwd_bwd_jobs


def memory_pass(args, providers, timed):
    """{case key: peak extra MiB} of every case in `timed`, each measured after one warm-up run
    (which compiles and lazily initialises what it needs)."""
    device = torch.device(args.device)
    harness.prepare_memory_measurement(device)
    steps = {p: make_step(p) for p in providers if p != "gemm-bound"}
    peaks = {}
    for key, (setup, fn) in jobs(args, device, providers, steps):
        if key not in timed:
            continue
        fn(setup() if setup else None)
        peaks[key] = harness.peak_extra_mib(fn, device, setup)
    return peaks


def run(args):
    """Times every case and measures its peak extra memory, appending rows to the device's CSV.

    CUDA: each case's row is appended as soon as it is measured, so a run stopped at a time limit
    keeps what it finished. CPU: all timings first, then every case's memory in a fresh process
    (harness.py: the measurement needs a pristine heap and would slow the timings), then the rows.
    """
    device = torch.device(args.device)
    providers = args.providers or providers_for(device)
    steps = {p: make_step(p) for p in providers if p != "gemm-bound"}
    commit, stamp = harness.git_commit(), harness.timestamp()
    print(f"device {harness.device_name(device)}  commit {commit}  torch {torch.__version__}  "
          f"threads {torch.get_num_threads()}  E={args.emb} B={args.block} C={args.classes}")

    def row(key, timing, peak):
        dtype_name, n, mode, provider = key
        p50, p20, p80 = timing
        return dict(kernel=KERNEL, provider=recorded_name(provider), mode=mode, dtype=dtype_name, n_pairs=n, emb=args.emb,
                    block=args.block, classes=args.classes, ms_p50=round(p50, 3), ms_p20=round(p20, 3),
                    ms_p80=round(p80, 3), peak_mem_mib=round(peak, 1), device=harness.device_name(device),
                    commit=commit, timestamp=stamp)

    timings, rows, refused = {}, [], {}
    for key, (setup, fn) in jobs(args, device, providers, steps, refused):
        dtype_name, n, mode, provider = key
        if (dtype_name, n, provider.removesuffix(harness.GRAPH)) in refused:  # a graph of a refused step too
            continue
        reps = args.reps if n != args.large_n else 2
        try:
            timing = harness.time_ms(fn, device, setup, min_reps=reps, budget_s=args.seconds)
            if isinstance(fn, harness.GraphedStep):
                peak = fn.peak_mib  # a replay allocates nothing: the capture's peak
            elif device.type == "cuda":
                peak = harness.peak_extra_mib(fn, device, setup)
            else:
                peak = None  # measured in a process of its own, below
        except Exception as error:  # e.g. a backward that fails: the other providers' rows still count
            refused[dtype_name, n, provider] = f"{mode} failed: {type(error).__name__}: {error}"
            print(f"  {dtype_name:5s} N={n:6d} {provider}: {refused[dtype_name, n, provider]}: not benchmarked further",
                  flush=True)
            continue
        timings[key] = timing
        line = "  {:5s} N={:6d} {:8s} {:20s}".format(*key) + " {:10.2f} ms [{:.2f}, {:.2f}]".format(*timing)
        if peak is not None:
            rows.append(row(key, timing, peak))
            harness.append_rows(rows[-1:], device, args.results)
            line += f" {peak:9.1f} MiB"
        print(line, flush=True)
    if device.type == "cpu":
        print("peak extra memory ...", flush=True)
        spawn = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
            peaks = pool.submit(memory_pass, args, providers, set(timings)).result()
        rows = [row(key, timing, peaks[key]) for key, timing in timings.items()]
        harness.append_rows(rows, device, args.results)
    print_summary(rows)
    print(f"appended {len(rows)} rows to {os.path.join(args.results, harness.device_name(device) + '.csv')}")
    if refused:
        raise SystemExit("not benchmarked: " + "; ".join(f"{p} ({d}, N={n}): {why}" for (d, n, p), why in refused.items()))
    return rows


def print_summary(rows):
    """Per (dtype, N, mode): each fused provider against eager and compiled (a "+graph" row against
    theirs)."""
    key = lambda r: (r["dtype"], r["n_pairs"], r["mode"])  # noqa: E731
    groups = {}
    for r in rows:
        groups.setdefault(key(r), {})[r["provider"]] = r
    print("\nsummary (time ratio = other / fused, higher is better; memory = fused / eager)")
    for (dtype, n, mode), by in groups.items():
        for name, r in by.items():
            if not name.startswith("fused-"):
                continue
            suffix = harness.GRAPH if name.endswith(harness.GRAPH) else ""
            eager, compiled, gemm_bound = (by.get(other + suffix) for other in ("eager", "compiled", "gemm-bound"))
            parts = [f"{dtype:5s} N={n:6d} {mode:8s} {name:20s} {r['ms_p50']:9.2f} ms"]
            for other_name, other in (("eager", eager), ("compiled", compiled)):
                if other:
                    parts.append(f"{other['ms_p50'] / r['ms_p50']:5.2f}x vs {other_name}{suffix}")
            if gemm_bound:
                parts.append(f"{r['ms_p50'] / gemm_bound['ms_p50']:5.2f}x gemm-bound{suffix} time")
            if eager and eager["peak_mem_mib"] > 0:
                parts.append(f"mem {100 * r['peak_mem_mib'] / eager['peak_mem_mib']:5.1f}% of eager{suffix}")
            parts.append(f"({r['peak_mem_mib']:.0f} MiB)")
            print("  " + "  ".join(parts))


def parse_args(argv=None):
    cuda = torch.cuda.is_available()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if cuda else "cpu")
    p.add_argument("--n", type=int, nargs="+", help="pair counts (default: CPU 512 2048 4096; CUDA 1024 4096 16384)")
    p.add_argument("--large-n", type=int, help="extra N run by the fused providers only, fwd_bwd, twice "
                   "(default on the CPU: 16384, where eager would need ~9 GiB; 0 to skip)")
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), help="default: CPU fp32; CUDA fp32 bf16 "
                   "(bf16 = torch.autocast with fp32 parameters, as ATLOP trains)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, metavar="PROVIDER",
                   help=f"any of {', '.join(PROVIDERS)} (default: every one available on the device)")
    p.add_argument("--cuda-graphs", action="store_true", help="CUDA: also time each provider's fwd_bwd step "
                   "captured in a CUDA graph and replayed (rows '<provider>+graph'): GPU time without the host's")
    p.add_argument("--reps", type=int, default=5, help="minimum timed repetitions")
    p.add_argument("--seconds", type=float, default=3.0, help="keep repeating (up to 100) while under this time")
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--classes", type=int, default=97)
    p.add_argument("--results", default=harness.RESULTS_DIR, help="directory of the CSV files")
    args = p.parse_args(argv)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.cuda_graphs and not on_cuda:
        p.error("--cuda-graphs needs --device cuda (CUDA graphs capture GPU work)")
    if args.cuda_graphs and "fwd_bwd" not in args.modes:
        p.error("--cuda-graphs replays fwd_bwd steps: add fwd_bwd to --modes")
    args.n = args.n or ([1024, 4096, 16384] if on_cuda else [512, 2048, 4096])
    args.dtypes = args.dtypes or (["fp32", "bf16"] if on_cuda else ["fp32"])
    if args.large_n is None:
        args.large_n = 0 if on_cuda else 16384
    return args


if __name__ == "__main__":
    run(parse_args())
