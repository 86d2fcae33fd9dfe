"""The C++/CUDA extension ops (``torch.ops.ncrl_kernels.*``, schemas in csrc/ops.cpp): their fake
kernels and autograd, and the backend functions "cpp" (CPU tensors) and "cuda" (CUDA tensors) run.

Importing this module does not fail when ``ncrl_kernels._C`` was not built, or was built against
another torch (then it is not loaded at all: ``_build_info.TORCH_VERSION``, written by setup.py, is
compared first): ``LOAD_ERROR`` says why (and what to do), the dispatcher reports those backends
as unavailable, and an ``ExtensionNotLoadedWarning`` says so once per process (an error only where
warnings are errors).
"""
import importlib.util
import pathlib
import warnings

import torch

from . import _op_autograd


REBUILD = ("reinstall with `pip install --no-build-isolation -e .` in a checkout (elsewhere the same without -e, "
           "from the sources; see README, 'Install')")


class ExtensionNotLoadedWarning(RuntimeWarning):
    """ncrl_kernels._C did not load: no "cpp" or "cuda" backend in this process."""


def load_error(exc, package_dir):
    """Why ``_C`` did not import, from its ImportError `exc`, for the package at `package_dir`."""
    root = package_dir.parent
    if (root / "setup.py").is_file() and (root / "csrc").is_dir() and not any(package_dir.glob("_C*")):
        # Python's own message ("partially initialized module ... circular import") misleads here:
        # a source checkout without a built _C, found before the installed copy (if any).
        return (f"ncrl_kernels was imported from the source checkout {root}, where the extension is not built "
                "(the current directory, the script's directory or PYTHONPATH comes before any installed copy); "
                f"run from another directory, or build it in place: {REBUILD}")
    return f"{type(exc).__name__}: {exc}; {REBUILD}"  # not built, or an unrecorded build for another torch


def torch_mismatch(build_version, running_version):
    """Why an extension compiled against torch `build_version` must not be loaded into torch
    `running_version`, or None. Another torch's extension may even load and then corrupt memory on
    its first call (seen: "free(): invalid pointer" after `pip install -U torch`), so the versions
    are compared before loading it."""
    if build_version == running_version:
        return None
    return (f"it was compiled against torch {build_version} and this is torch {running_version} (the extension "
            f"runs only with the torch it was built with); {REBUILD}")


# An editable install maps its own modules into an ncrl_kernels imported from anywhere else
# (setuptools' finder answers where the package's directory has none of them): a _C built from other
# sources, perhaps for another torch, and another build's record. Only the package's own are used.


def in_directory(path, directory):
    return pathlib.Path(path).parent.resolve() == directory.resolve()


def _build_record(package_dir):
    """What setup.py recorded next to _C: (the torch it was compiled against, the
    TORCH_CUDA_ARCH_LIST of its CUDA kernels or None); for a build without a record (made before
    setup.py wrote one), the running torch and None: nothing to check."""
    try:
        from . import _build_info
    except ImportError:
        return torch.__version__, None
    if getattr(_build_info, "__file__", None) and not in_directory(_build_info.__file__, package_dir):
        return torch.__version__, None  # another copy's
    return _build_info.TORCH_VERSION, getattr(_build_info, "CUDA_ARCHS", None)


def _load():
    """(LOAD_ERROR, CUDA_ARCH_LIST): None and the build's arch list once _C is loaded, else why it
    was not and None."""
    package_dir = pathlib.Path(__file__).parent
    found = importlib.util.find_spec(f"{__package__}._C")
    origin = found.origin if found is not None else None
    if origin is not None and not in_directory(origin, package_dir):
        return (f"the compiled extension Python would load, {origin}, is not in this package's directory "
                f"{package_dir} (an editable install of a copy elsewhere maps it in), so it is not loaded; import "
                f"ncrl_kernels from that copy, or build this one: {REBUILD}"), None
    if origin is None:  # a record without a _C (a stale one, say) says nothing
        arch_list = None
    else:
        build_torch, arch_list = _build_record(package_dir)
        mismatch = torch_mismatch(build_torch, torch.__version__)
        if mismatch is not None:
            return mismatch, None
    try:
        from . import _C  # noqa: F401  (loading the library registers the ops)
    except ImportError as exc:
        return load_error(exc, package_dir.resolve()), None
    return None, arch_list


# CUDA_ARCH_LIST: the architectures the CUDA kernels were built for (the dispatcher checks a GPU
# against it), None when unknown or not built.
LOAD_ERROR, CUDA_ARCH_LIST = _load()
if LOAD_ERROR is not None:
    warnings.warn(f"ncrl_kernels: the compiled extension is not available, so backend='auto' runs the unfused "
                  "reference on CPU tensors (it builds the [N, E*B] feature) and CUDA has no 'cuda' fallback: "
                  f"{LOAD_ERROR}", ExtensionNotLoadedWarning)


# Devices the extension has kernels for, read once: the dispatcher consults this on every call,
# including inside torch.compile, which cannot trace the query itself.
KERNEL_DEVICES = frozenset(
    key for key in ("CPU", "CUDA")
    if LOAD_ERROR is None and torch._C._dispatch_has_kernel_for_dispatch_key("ncrl_kernels::head_forward", key)
)


def has_kernel(dispatch_key):
    """Whether the extension registered kernels for a device ("CPU", "CUDA")."""
    return dispatch_key in KERNEL_DEVICES


def _below_autograd(op):
    """`op` straight to its C++ kernel, past its registered Python autograd, which with grad mode
    off would only redispatch there (13-18 us of host time per call on this project's CPU): what
    eager calls' autograd.Functions run (_op_autograd.OpFamily)."""

    def call(*args):
        with torch._C._AutoDispatchBelowAutograd():
            return op(*args)
    return call


def _head_backward_in(head_backward):
    """The C++ head backward as OpFamily calls it: `weight_grad_dtype` is not passed on, as the
    kernels write d weight in the (cast) weight's dtype; autograd casts it to the dtype of the
    Function's input (under autocast, the uncast weight's) as it returns it. A fused op's
    `grad_scale` scales its d loss / d logits first."""

    def call(grad_logits, *args, weight_grad_dtype=None, grad_scale=None):
        if grad_scale is not None:
            grad_logits = _op_autograd.scaled_grad(grad_scale, grad_logits)
        return head_backward(grad_logits, *args)
    return call


if LOAD_ERROR is None:
    _OPS = {name: getattr(torch.ops.ncrl_kernels, name) for name in _op_autograd.FAKES}
    for _name, _fake in _op_autograd.FAKES.items():
        torch.library.register_fake(f"ncrl_kernels::{_name}")(_fake)
    _IMPLS = {name: _below_autograd(op) for name, op in _OPS.items()}
    _IMPLS["head_backward"] = _head_backward_in(_IMPLS["head_backward"])
    _FAMILY = _op_autograd.OpFamily(_OPS, _IMPLS)
    _op_autograd.register_autograd(
        lambda name, backward, setup: torch.library.register_autograd(
            f"ncrl_kernels::{name}", backward, setup_context=setup),
        _FAMILY.head_backward,
    )


# Backend functions (arguments already validated, labels already float).


def group_bilinear(hs, ts, weight, bias, block_size, symmetric, autocast):
    return _FAMILY("head_forward", hs, ts, weight, bias, block_size, symmetric, autocast=autocast)


def loss_fn(logits, labels, loss, gamma, margin_reg, reduction):
    return _FAMILY("loss_forward", logits, labels, loss, float(gamma), margin_reg, reduction)[0]


def fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction, autocast):
    value, logits, _ = _FAMILY(
        "fused_forward", hs, ts, weight, bias, labels, block_size, symmetric, loss, float(gamma), margin_reg, reduction,
        autocast=autocast,
    )
    return value, logits
