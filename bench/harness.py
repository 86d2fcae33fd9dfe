"""Measurement helpers of the benchmarks: timing quantiles, peak extra memory, CSV rows.

Peak extra memory is what a step allocates on top of what already exists when it starts
(inputs, parameters, and in "bwd" mode the forward's saved tensors):
- CUDA: torch.cuda.max_memory_allocated() after a reset, minus memory_allocated() before.
- CPU: the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs)
  minus its resident set before. This only tracks live memory if glibc returns freed blocks to
  the OS at once and never serves a tensor from memory the heap kept: `prepare_memory_measurement`
  sets that up (mallopt M_MMAP_THRESHOLD = 64 KiB) and must run before the process allocates
  anything large. Because it also turns every later allocation into fresh page faults, which
  slows timings, bench/run.py measures CPU memory in a process of its own.
"""
import contextlib
import csv
import ctypes
import datetime
import gc
import os
import platform
import re
import statistics
import subprocess
import time

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CSV_COLUMNS = ["kernel", "provider", "mode", "dtype", "n_pairs", "emb", "block", "classes", "ms_p50", "ms_p20",
               "ms_p80", "peak_mem_mib", "device", "commit", "timestamp"]
RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def device_name(device):
    """File-name-safe machine name: the GPU model, or the CPU model and thread count."""
    if device.type == "cuda":
        raw = torch.cuda.get_device_name(device)
    else:
        raw = platform.processor() or "cpu"
        try:
            with open("/proc/cpuinfo") as f:
                raw = re.search(r"model name\s*:\s*(.+)", f.read()).group(1)
        except (OSError, AttributeError):
            pass
        raw = f"cpu {raw} {torch.get_num_threads()}t"
    return re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")


def git_commit():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        # Results the benchmarks append to do not make the code dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root, capture_output=True, text=True).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class CpuMemory:
    """Peak resident memory of this process, resettable (Linux)."""

    M_MMAP_THRESHOLD = -3

    def __init__(self):
        ctypes.CDLL("libc.so.6").mallopt(self.M_MMAP_THRESHOLD, 1 << 16)

    @staticmethod
    def _status_mib(key):
        with open("/proc/self/status") as f:
            return int(re.search(key + r":\s+(\d+) kB", f.read()).group(1)) / 1024

    def start(self):
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident set
        return self._status_mib("VmRSS")

    def peak_since(self, start):
        return self._status_mib("VmHWM") - start


_CPU_MEMORY = None


def prepare_memory_measurement(device):
    """Set up peak-memory measurement; on the CPU, call it before allocating anything large."""
    global _CPU_MEMORY
    if device.type == "cpu" and _CPU_MEMORY is None:
        _CPU_MEMORY = CpuMemory()


def peak_extra_mib(fn, device, setup=None):
    """Run `fn` once (after `setup`, not measured) and return the extra peak memory in MiB."""
    state = setup() if setup else None
    gc.collect()
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn(state)
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    if _CPU_MEMORY is None:
        raise RuntimeError("call prepare_memory_measurement(device) first, before any large allocation")
    start = _CPU_MEMORY.start()
    fn(state)
    return _CPU_MEMORY.peak_since(start)


class LiveStorages(TorchDispatchMode):
    """Inside: tracks the storages the ops allocate (views of the `existing` tensors aside) until
    they are released; `peak` is the most bytes live at once: the peak of requested bytes, a
    lower bound of the CUDA allocator's peak, which counts whole blocks (bench/memory_model.py).
    Not seen: a single op's internal temporaries. Ops see the mode as a dispatch mode: the
    package's eager route takes the registered operators under one unless told otherwise."""

    def __init__(self, existing):
        super().__init__()
        self.existing = {x.untyped_storage().data_ptr() for x in existing}
        self.live = {}  # data pointer -> (weak reference, bytes)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {at: (ref, size) for at, (ref, size) in self.live.items() if not ref.expired()}
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                storage = x.untyped_storage()
                at = storage.data_ptr()
                if storage.nbytes() and at not in self.live and at not in self.existing:
                    self.live[at] = (StorageWeakRef(storage), storage.nbytes())
        self.peak = max(self.peak, sum(size for _, size in self.live.values()))
        return out


def time_ms(fn, device, setup=None, *, min_reps=5, max_reps=100, budget_s=3.0, warmup=2):
    """Median, 20th and 80th percentile wall time of `fn(setup())` in ms (setup not timed).

    Runs at least `min_reps` times and more while under `budget_s` seconds (up to `max_reps`)."""
    for _ in range(warmup):
        fn(setup() if setup else None)
    synchronize(device)
    times = []
    while len(times) < min_reps or (sum(times) < budget_s * 1e3 and len(times) < max_reps):
        times.append(wall_ms(fn, device, setup() if setup else None))
    return spread(times)


def wall_ms(fn, device, state=None):
    """Wall time of one `fn(state)` in ms, the device drained before and after."""
    synchronize(device)
    start = time.perf_counter()
    fn(state)
    synchronize(device)
    return (time.perf_counter() - start) * 1e3


# The suffix of a provider's rows timed as GraphedStep replays (bench/run.py --cuda-graphs).
GRAPH = "+graph"


class GraphedStep:
    """`fn(setup())` captured into a CUDA graph on its first call, then replayed on every call: the
    step's GPU time without the host's (the host only launches the graph). The capture follows
    torch.cuda.graphs' whole-network recipe: warm-up runs on a side stream, then the capture on
    that stream (so that what the warm-up set up for it, such as a cuBLAS workspace, is reused);
    everything the step allocates lives in the graph's own memory pool from then on.
    `peak_mib` is the capture's peak extra memory (peak_extra_mib, as for a step run normally)."""

    WARMUP = 3

    def __init__(self, fn, setup, device):
        self.fn, self.setup, self.device = fn, setup, device
        self.graph, self.peak_mib = None, None

    def __call__(self, _):
        if self.graph is None:
            self.graph = self._capture()
        self.graph.replay()

    def _capture(self):
        fn, setup, device = self.fn, self.setup, self.device
        caller = torch.cuda.current_stream(device)
        side = torch.cuda.Stream(device)
        side.wait_stream(caller)
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP):
                fn(setup() if setup else None)
        caller.wait_stream(side)
        graph = torch.cuda.CUDAGraph()

        def capture(state):
            with torch.cuda.graph(graph, stream=side):
                fn(state)

        try:
            self.peak_mib = peak_extra_mib(capture, device, setup)
        except Exception as error:
            # torch.cuda.graph leaves the capture stream current when its capture fails, and then
            # reports only that the capture was invalidated: the cause is the error before.
            torch.cuda.set_stream(caller)
            causes = [e for e in (error.__context__, error) if e is not None]
            raise RuntimeError("CUDA graph capture failed: " + "; then ".join(
                f"{type(e).__name__}: {e}" for e in causes)) from error
        return graph


def interleaved(measures, *, min_rounds, budget_s=0.0, max_rounds=100, warmup_rounds=1):
    """{name: [one value per round]} of `measures` (name -> a function that measures once and
    returns the value): every measure runs once per round, each first in turn, so that drift and
    order effects on a noisy machine hit them alike, and a round's values can be compared pair by
    pair. At least `min_rounds` rounds, more while the rounds took under `budget_s` seconds (up to
    `max_rounds`), after `warmup_rounds` rounds that are not kept."""
    names = list(measures)
    values = {name: [] for name in names}
    start, round_ = time.perf_counter(), 0
    while True:
        kept = round_ - warmup_rounds
        if kept >= min_rounds and (kept >= max_rounds or time.perf_counter() - start >= budget_s):
            return values
        first = round_ % len(names)
        for name in names[first:] + names[:first]:
            value = measures[name]()
            if kept >= 0:
                values[name].append(value)
        if kept < 0:
            start = time.perf_counter()  # the budget counts the kept rounds
        round_ += 1


def spread(values):
    """Median, 20th and 80th percentile of `values` (all three the value itself if there is one)."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q = statistics.quantiles(values, n=10, method="inclusive")
    return statistics.median(values), q[1], q[7]


def batch_us(device, step, steps):
    """Host time per step in microseconds of `steps` steps issued back to back (the GPU, if any,
    drained before)."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) * 1e6 / steps


def host_us(device, step, steps, repeats):
    """Median, 20th and 80th percentile host time per step in microseconds, over `repeats` runs of
    `steps` steps issued back to back."""
    for _ in range(3):
        step()
    times = [batch_us(device, step, steps) for _ in range(repeats)]
    synchronize(device)
    return spread(times)


def triton_launch_suffix():
    """"-jit" where the Triton backend's launches take Triton's JITFunction.run instead of
    LeanLaunch (NCRL_KERNELS_LEAN_LAUNCH=0, which make gpu-check sets where LeanLaunch fails its
    check), else "": rows timed that way are named apart, as their launches cost the host more."""
    from ncrl_kernels.triton_kernels import _launch

    return "" if _launch.LEAN else "-jit"


class NoLaunch:
    """Stands in for launcher(kernel)[grid]: counts launches, runs nothing."""

    launches = 0

    def __init__(self, kernel):
        pass

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            NoLaunch.launches += 1
        return launch


@contextlib.contextmanager
def triton_launches_through(launcher):
    """The Triton kernels' launch sites call `launcher(kernel)[grid](...)` while inside (NoLaunch:
    nothing is launched)."""
    from ncrl_kernels.triton_kernels.backend import LAUNCHING_MODULES as modules

    launchers = [module.launcher for module in modules]
    for module in modules:
        module.launcher = launcher
    try:
        yield
    finally:
        for module, previous in zip(modules, launchers):
            module.launcher = previous


def append_rows(rows, device, results_dir=RESULTS_DIR, suffix="", columns=CSV_COLUMNS):
    """Append rows (dicts with `columns`) to results/<device><suffix>.csv; returns the path."""
    os.makedirs(results_dir, exist_ok=True)
    path = os.path.join(results_dir, f"{device_name(device)}{suffix}.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    return path


def timestamp():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
