"""How the package's kernels are launched: ``launcher(kernel)[grid](*args, **constants)`` at every
launch site, the runtime arguments positional and the constexprs and launch options by keyword.

At DocRED's sizes a GPU runs a fused step's kernels faster than the host issues them
(docs/triton.md, "Where the time goes"), so the host's cost per launch is the step's time.
Three routes, the cheapest that is correct:

- wrap_triton's higher-order op where an operator is being traced (torch.compile, export), so
  Inductor sees the kernels; outside ``direct_launches`` eager launches would take it too, at
  about 150 us of Python per launch on this project's 2-core CPU;
- the kernel itself (``JITFunction.run``) under the interpreter (TRITON_INTERPRET=1), which
  wrap_triton cannot trace, and for a config's first launch;
- ``LeanLaunch`` for every other launch on a GPU: the compiled kernel, cached on what Triton
  specialises it on, straight to its C launcher. ``JITFunction.run`` re-derives a launch's
  specialisation, options and cache key on every call: 10-19 us per launch of these kernels on
  this project's CPU (Triton 3.6, `bench/launch_overhead.py`), against about 3 for LeanLaunch.
"""
import functools

from torch._library.triton import is_wrap_triton_enabled, set_wrap_triton_enabled  # private, torch >= 2.6
from torch.library import wrap_triton
from triton import knobs
from triton.runtime.driver import driver

from .._dispatch import TRITON_INTERPRET

try:  # Triton's own rule for what a kernel is specialised on (3.6 to 3.9 at least)
    from triton._C.libtriton import native_specialize_impl
except ImportError:  # another Triton: every launch takes JITFunction.run
    native_specialize_impl = None


def direct_launches():
    """A context in which ``launcher(kernel)[grid](...)`` launches the kernel straight through
    Triton, as a ``triton_op``'s own eager kernel does. Outside one, every launch goes through
    wrap_triton's higher-order op, there for tracing: about 150 us of Python per launch on this
    project's 2-core CPU (a step's four launches of compiled kernels whose run does nothing: 787 us
    against 193 us direct, docs/triton.md), about 0.2 ms on the H200 machine's host
    (bench/kernels.py, first GPU run)."""
    return set_wrap_triton_enabled(False)


def launcher(kernel):
    """What the launch sites index with the grid: ``wrap_triton(kernel)`` where wrap_triton is on
    (an operator being traced, or outside ``direct_launches``), else the kernel's LeanLaunch.
    Interpreted kernels (TRITON_INTERPRET=1), which wrap_triton cannot trace, launch as they are:
    torch 2.13's wrap_triton returns them unchanged, 2.11's raises."""
    if TRITON_INTERPRET:
        return kernel
    if is_wrap_triton_enabled():
        return wrap_triton(kernel)
    return lean_launch(kernel)


@functools.lru_cache(maxsize=None)
def lean_launch(kernel):
    return LeanLaunch(kernel)


def launch_hooks_idle():
    """Whether no launch hook is set (a profiler such as Proton sets them; they are given launch
    metadata, which LeanLaunch does not build). Triton 3.6 keeps them as (empty) HookChains."""
    return all(hook is None or not getattr(hook, "calls", True)
               for hook in (knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook))


class LeanLaunch:
    """``kernel[grid](*args, **constants)``, with the compiled kernel looked up on a key that holds
    everything Triton specialises it on: the device, each positional argument's specialisation by
    Triton's own rule (dtype and 16-byte alignment of a tensor, the integer type and, unless the
    kernel says not to, divisibility of an int; None), the constexprs and the options. The first
    launch of each key, and any launch while a launch hook is set, goes through ``JITFunction.run``,
    which compiles or finds the kernel; later ones call the compiled kernel's C launcher with the
    arguments ``JITFunction.run`` would pass it (`bench/launch_overhead.py` checks that they are
    the same). Not seen: a change of TRITON_DEBUG or of the kernel's source within a process."""

    def __init__(self, kernel):
        self.kernel = kernel
        # Per parameter, the flags JITFunction's binder hands native_specialize_impl.
        self.flags = [(param.is_const, not param.do_not_specialize, not param.do_not_specialize_on_alignment)
                      for param in kernel.params]
        self.compiled = {}  # key -> (compiled kernel, the constexprs in signature order)

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **constants):
        device = driver.active.get_current_device()
        key = self.key(device, args, constants)
        entry = self.compiled.get(key)
        if entry is None or not launch_hooks_idle():
            compiled = self.kernel[grid](*args, **constants)
            if key is not None:
                self.remember(key, compiled, len(args), constants)
            return
        compiled, constexprs = entry
        compiled.run(grid[0], grid[1] if len(grid) > 1 else 1, grid[2] if len(grid) > 2 else 1,
                     driver.active.get_current_stream(device), compiled.function, compiled.packed_metadata, None,
                     knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook, *args, *constexprs)

    def key(self, device, args, constants):
        """The cache key of a launch, None where LeanLaunch does not apply (another Triton)."""
        if native_specialize_impl is None:
            return None
        backend = self.kernel.device_caches[device][3]
        return (device, tuple(constants.items()),
                *(native_specialize_impl(backend, arg, *flags) for arg, flags in zip(args, self.flags)))

    def remember(self, key, compiled, positional, constants):
        """Keep `compiled` for `key` if the C launcher can be called as JITFunction.run calls it:
        the positional arguments come first in the signature, the constexprs after them, no
        argument is left to a default, the kernel has no pre-run hook and is compiled (not a
        future of Triton's asynchronous compilation)."""
        names = self.kernel.arg_names
        if (self.kernel.pre_run_hooks or not hasattr(compiled, "packed_metadata")
                or any(param.annotation_type for param in self.kernel.params[:positional])
                or any(name not in constants for name in names[positional:])):
            return
        self.compiled[key] = (compiled, tuple(constants[name] for name in names[positional:]))
