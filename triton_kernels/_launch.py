"""How the package's kernels are launched: ``launcher(kernel)[grid](*args, **constants)`` at every
launch site, the runtime arguments positional and the constexprs and launch options by keyword.

At DocRED's sizes a GPU runs a fused step's kernels faster than the host issues them
(docs/triton.md, "Where the time goes"), so the host's cost per launch is the step's time.
Three routes, the cheapest that is correct:

- wrap_triton's higher-order op where an operator is being traced (torch.compile, export), so
  Inductor sees the kernels; outside ``direct_launches`` eager launches would take it too, at
  about 150 us of Python per launch on this project's 2-core CPU;
- the kernel itself (``JITFunction.run``) under the interpreter (TRITON_INTERPRET=1), which
  wrap_triton cannot trace, and for a config's first launch or while a hook is set;
- ``LeanLaunch`` for every other launch on a GPU (unless ``NCRL_KERNELS_LEAN_LAUNCH=0``): the
  compiled kernel, cached on what Triton compiles it for, straight to its C launcher.
  ``JITFunction.run`` re-derives a launch's specialisation, options and cache key on every call,
  which costs this project's CPU 1.5-2x as much per launch as LeanLaunch
  (`bench/launch_overhead.py`, docs/triton.md).
"""
import functools
import itertools
import os

# private, torch >= 2.6: wrap_triton_enabled is the threading.local behind is_wrap_triton_enabled
from torch._library.triton import is_wrap_triton_enabled, wrap_triton_enabled
from torch.library import wrap_triton
from triton import knobs
from triton.runtime.driver import driver

from .._dispatch import TRITON_INTERPRET

try:  # Triton's own rule for what a kernel is specialised on (3.6 to 3.9 at least)
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # another Triton: every launch takes JITFunction.run
    native_specialize_impl = None

# Whether launches on a GPU take LeanLaunch. It relies on Triton internals (checked for 3.6 to 3.9),
# so NCRL_KERNELS_LEAN_LAUNCH=0 (or false, no, off), read here at import, sends every launch through
# JITFunction.run instead: the way out should a Triton release change them (make gpu-check sets it
# when tests/test_triton.py::test_lean_launch_gives_jit_run_bits fails on the GPU).
LEAN = (native_specialize_impl is not None
        and os.environ.get("NCRL_KERNELS_LEAN_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off"))


class direct_launches:
    """A context in which ``launcher(kernel)[grid](...)`` launches the kernel straight through
    Triton, as a ``triton_op``'s own eager kernel does. Outside one, every launch goes through
    wrap_triton's higher-order op, there for tracing: about 150 us of Python per launch on this
    project's 2-core CPU (a step's four launches of compiled kernels whose run does nothing: 787 us
    against 193 us direct, docs/triton.md), about 0.2 ms on the H200 machine's host
    (bench/kernels.py, first GPU run).

    It switches wrap_triton off as torch's ``set_wrap_triton_enabled(False)`` does, without a
    generator-based context manager: the eager route enters one twice before the weight grad's
    launch, which a host-bound step waits for (0.5 against 2 us each on this project's CPU)."""

    __slots__ = ("previous",)

    def __enter__(self):
        self.previous = is_wrap_triton_enabled()
        wrap_triton_enabled.value = False

    def __exit__(self, *exc_info):
        wrap_triton_enabled.value = self.previous


def launcher(kernel):
    """What the launch sites index with the grid: ``wrap_triton(kernel)`` where wrap_triton is on
    (an operator being traced, or outside ``direct_launches``), else the kernel's LeanLaunch (the
    kernel itself where ``LEAN`` is false). Interpreted kernels
    (TRITON_INTERPRET=1), which wrap_triton cannot trace, launch as they are: torch 2.13's
    wrap_triton returns them unchanged, 2.11's raises."""
    if TRITON_INTERPRET:
        return kernel
    if is_wrap_triton_enabled():
        return wrap_triton(kernel)
    if not LEAN:
        return kernel
    lean = _LEAN.get(id(kernel))
    if lean is None:
        lean = _LEAN[id(kernel)] = LeanLaunch(kernel)  # holds the kernel: its id stays its own
    return lean


_LEAN = {}  # id(kernel) -> its LeanLaunch (a dict on ids: hashing a JITFunction takes a lock)


def triton_settings():
    """What JITFunction.run adds to a launch's options or cache key from Triton's settings, None
    where a launch must take JITFunction.run: while a launch hook (a profiler such as Proton; they
    read launch metadata, which LeanLaunch does not build) or a compiler-stage hook is set. Triton
    3.6 to 3.9 keep the launch hooks as HookChains, empty unless set."""
    runtime, compilation = knobs.runtime, knobs.compilation
    enter, exit_ = runtime.launch_enter_hook, runtime.launch_exit_hook
    if (runtime.add_stages_inspection_hook is not None or (enter is not None and getattr(enter, "calls", True))
            or (exit_ is not None and getattr(exit_, "calls", True))):
        return None
    return (runtime.debug, compilation.instrumentation_mode, getattr(compilation, "fpsan_homomorphic_casts", None))


class LeanLaunch:
    """``kernel[grid](*args, **constants)`` for a grid of up to three ints, the runtime arguments
    positional, the constexprs and options by keyword, with the compiled kernel looked up on a key
    that holds everything Triton 3.6 to 3.9 compile it for: the device, each positional argument's
    specialisation by Triton's own rule (dtype and 16-byte alignment of a tensor, the integer type
    and, unless the kernel says not to, divisibility of an int; None), the constexprs and options
    (compared with ==, as Triton's own in-process cache does) and the settings JITFunction.run
    reads (``triton_settings``). A key's first launch, and any launch while a hook is set, goes
    through ``JITFunction.run``, which compiles or finds the kernel; later ones call the compiled
    kernel's C launcher with the arguments ``JITFunction.run`` would pass it
    (`bench/launch_overhead.py` checks that they are the same). Unlike JITFunction.run, it does
    not check that the globals a kernel reads are unchanged since it was compiled."""

    def __init__(self, kernel):
        self.kernel = kernel
        # Per parameter, the flags JITFunction's binder hands native_specialize_impl, as three
        # columns (is_const, specialise, align), which key() maps it over with the arguments.
        self.flags = tuple(zip(*[(param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment)
                                 for param in kernel.params]))
        self.compiled = {}  # key -> (compiled kernel, the constexprs in signature order)

    def __getitem__(self, grid):
        if callable(grid):  # evaluated on the bound arguments: JITFunction.run's job
            return self.kernel[grid]
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **constants):
        device = driver.active.get_current_device()
        settings = triton_settings()
        key = self.key(device, settings, args, constants)
        entry = self.compiled.get(key)
        if entry is None or self.kernel.pre_run_hooks:
            compiled = self.kernel[grid](*args, **constants)
            if key is not None and triton_settings() == settings:  # not changed meanwhile (threads)
                self.remember(key, compiled, len(args), constants)
            return
        compiled, constexprs = entry
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args, *constexprs)

    def key(self, device, settings, args, constants):
        """The cache key of a launch, None where it must take JITFunction.run (a hook is set)."""
        if settings is None:
            return None
        backend = self.kernel.device_caches[device][3]
        # map over a C function: no Python frame per argument (the key is most of a launch's cost)
        return (device, settings, tuple(constants.items()),
                *map(native_specialize_impl, itertools.repeat(backend), args, *self.flags))

    def remember(self, key, compiled, positional, constants):
        """Keep `compiled` for `key` if the C launcher can be called as JITFunction.run calls it:
        a compiled kernel came back (a compile hook may return None; under Triton's asynchronous
        compilation, the kernel a future resolved to), the positional arguments are the signature's
        first ones and all runtime arguments (specialised by Triton's rule, which the key applies to
        them), and the keyword ones are its constexprs, every one given (the key holds their
        values)."""
        if hasattr(compiled, "result"):  # a FutureKernel (Triton >= 3.7), already resolved by the launch
            compiled = compiled.result()
        params = self.kernel.params
        if (not hasattr(compiled, "packed_metadata")
                or any(param.is_constexpr or param.annotation_type for param in params[:positional])
                or not all(param.is_constexpr and param.name in constants for param in params[positional:])):
            return
        self.compiled[key] = (compiled, tuple(constants[param.name] for param in params[positional:]))
