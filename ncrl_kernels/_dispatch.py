"""The dispatch table: every backend, whether it can run for a device (and why not), and which one
``backend="auto"`` picks.

A backend implementation is a module with three functions taking validated arguments:
``group_bilinear(hs, ts, weight, bias, block_size, symmetric, autocast)``,
``loss_fn(logits, labels, loss, gamma, margin_reg, reduction)`` and
``fused(hs, ts, weight, bias, labels, block_size, symmetric, loss, gamma, margin_reg, reduction,
autocast)`` returning ``(loss, logits)``. ``autocast`` is the autocast dtype (None: off): the
backend runs the head in ``reference.head_dtype`` of its inputs and returns their gradients in
their own dtypes. All of them are differentiable.

Availability depends only on state fixed at import time (extension loaded, Triton installed,
TRITON_INTERPRET), on the device and, for the head, on the number of classes (``head_reason``),
so it is cheap and traces under ``torch.compile``.
"""
import collections
import importlib
import importlib.util
import os
import re

import torch

from . import _extension, _reference_backend

# Triton's interpreter runs kernels on CPU tensors and must be switched on before triton is
# imported, so the setting is read once here.
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("reference", "cpp", "cuda", "triton")
# Fastest first. The Triton interpreter is far slower than the reference, so "auto" never uses it.
AUTO_ORDER = {"cpu": ("cpp", "reference"), "cuda": ("triton", "cuda", "reference")}
# The Triton head kernels' configs are sized for class tiles up to 128 wide (DocRED's 97 classes,
# DialogRE's 36): at 129 classes 8 of their 18 variants need more shared memory than an H100 has
# and the 16-bit weight grads spill (docs/triton.md, "Known limits"), so the head is refused
# rather than left to fail at launch.
TRITON_MAX_CLASSES = 128


def major_minor(version):
    """(major, minor) of a version string, pre-releases included: "3.7.0rc1" -> (3, 7)."""
    return tuple(int(part) for part in re.match(r"(\d+)\.(\d+)", version).groups())


# A ROCm build of PyTorch gives AMD GPUs the device type "cuda". Neither GPU backend is made for
# them: setup.py builds the extension's CUDA kernels for CUDA torch only, and the Triton kernels'
# configs are NVIDIA's, chosen by compute capability, which ROCm reports as e.g. 9.4 for an MI300
# (Hopper's configs: up to 128 KB of shared memory, an MI300 has 64 KB), and fp32 at PyTorch's
# default precision runs as 3xTF32, which Triton's AMD backend does not have (docs/triton.md,
# "Which GPUs").
ROCM = torch.version.hip is not None
ROCM_REASON = ("this torch is a ROCm build (AMD GPU), and the {} kernels are made for NVIDIA GPUs only; "
               "use 'reference' (docs/triton.md, 'Which GPUs')")

# The Triton kernels' configs are built for compute capability 8.0 and newer: bf16 tensor cores,
# and shared memory of at least an RTX 30xx's (compile_check checks sm_80, sm_86, sm_89, sm_90).
TRITON_MIN_CAPABILITY = (8, 0)


def cuda_index(device):
    """The index of CUDA `device` (the current device for a bare "cuda")."""
    return torch.cuda.current_device() if device.index is None else device.index


_CAPABILITIES = {}  # CUDA device index -> (major, minor)


@torch.compiler.assume_constant_result
def cuda_capability(index):
    """(major, minor) compute capability of CUDA device `index`, read once (every Triton launch asks);
    a constant under torch.compile. Cached in a dict, not functools.lru_cache: Dynamo warns about
    an lru_cache wrapper and traces through it, losing the constant mark."""
    if index not in _CAPABILITIES:
        _CAPABILITIES[index] = torch.cuda.get_device_capability(index)
    return _CAPABILITIES[index]


def cuda_arch_list(spec):
    """[(major, minor, ptx)] of a TORCH_CUDA_ARCH_LIST such as "8.0;9.0+PTX", or None when an entry
    is not of that form (a name such as "Ampere", an arch-specific "9.0a"): then nothing is checked."""
    archs = []
    for entry in re.split(r"[;,\s]+", spec.strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)(\+PTX)?", entry)
        if match is None:
            return None
        archs.append((int(match[1]), int(match[2]), match[3] is not None))
    return archs or None


def runs_on(archs, capability):
    """Whether device code built for `archs` runs on a GPU of `capability`: machine code for X.Y
    on X.Y' with Y' >= Y; PTX for X.Y, compiled at load time, on anything from X.Y up."""
    return any((major == capability[0] and minor <= capability[1]) or (ptx and (major, minor) <= capability)
               for major, minor, ptx in archs)


# The extension's CUDA architectures, parsed once: the dispatcher runs inside torch.compile's
# traces, where the regular expressions would break the graph.
CUDA_ARCHS = cuda_arch_list(_extension.CUDA_ARCH_LIST) if _extension.CUDA_ARCH_LIST else None


def _cuda_arch_reason(device):
    """Why the extension's CUDA kernels have no code for `device`'s GPU, or None (also when the
    build recorded no arch list, or one cuda_arch_list cannot read)."""
    if CUDA_ARCHS is None:
        return None
    major, minor = cuda_capability(cuda_index(device))
    if runs_on(CUDA_ARCHS, (major, minor)):
        return None
    return (f"the extension's CUDA kernels were built for TORCH_CUDA_ARCH_LIST=\"{_extension.CUDA_ARCH_LIST}\", "
            f"which has no code for {device} (compute capability {major}.{minor}); rebuild with "
            f"TORCH_CUDA_ARCH_LIST=\"{major}.{minor}\" set: {_extension.REBUILD}")


def _extension_reason(dispatch_key):
    """Why the compiled extension cannot serve `dispatch_key` ("CPU", "CUDA"), or None."""
    if _extension.LOAD_ERROR is not None:
        return f"the C++ extension ncrl_kernels._C is not built or failed to load: {_extension.LOAD_ERROR}"
    if not _extension.has_kernel(dispatch_key):
        return (
            f"the extension was built without {dispatch_key} kernels (CPU-only torch or no CUDA toolkit at "
            f"build time); install a CUDA torch and the CUDA toolkit, then {_extension.REBUILD}"
        )
    return None


# What to use on tensors of a device type that a backend does not run on: the kernels made for it,
# else (meta, mps, xpu...) the reference.
RUNS_ON = collections.defaultdict(lambda: "'reference' or 'auto'", cpu="'cpp' or 'auto'", cuda="'cuda' or 'triton'")


def unavailable_reason(name, device):
    """None if backend `name` (one of BACKENDS) can run on tensors of `device`, else a sentence
    saying why not."""
    assert name in BACKENDS, name  # resolve() checks names first (check_backend_name)
    kind = device.type
    if name == "reference":
        return None
    if name == "cpp":
        if kind != "cpu":
            return f"'cpp' runs the C++ CPU kernels on CPU tensors, these are on {device}; use {RUNS_ON[kind]}"
        return _extension_reason("CPU")
    if name == "cuda":
        if kind != "cuda":
            return f"'cuda' runs on CUDA tensors, these are on {device}; use {RUNS_ON[kind]}"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available here (torch.cuda.is_available() is False)"
        if ROCM:
            return ROCM_REASON.format("extension's CUDA")
        return _extension_reason("CUDA") or _cuda_arch_reason(device)
    # "triton". The device first: installing Triton would not make it run on these tensors.
    if kind != "cuda" and not (kind == "cpu" and TRITON_INTERPRET):
        return (
            f"Triton kernels run on CUDA tensors, these are on {device} (on the CPU only under the "
            "interpreter: set TRITON_INTERPRET=1 before importing triton and ncrl_kernels)"
        )
    if not TRITON_INSTALLED:
        return "Triton is not installed (`pip install triton`)"
    if TRITON_IMPORT_ERROR is not None:
        return f"the Triton kernels failed to import ({TRITON_IMPORT_ERROR})"
    if kind == "cuda":
        if TRITON_INTERPRET:
            return "TRITON_INTERPRET=1 is set: Triton runs interpreted, on CPU tensors only"
        if not torch.cuda.is_available():
            return "no CUDA GPU is available here (torch.cuda.is_available() is False)"
        if ROCM:
            return ROCM_REASON.format("Triton")
        major, minor = cuda_capability(cuda_index(device))
        if (major, minor) < TRITON_MIN_CAPABILITY:
            return (
                f"the Triton kernels need compute capability {'.'.join(map(str, TRITON_MIN_CAPABILITY))} or "
                f"newer, {device} is {major}.{minor}; use 'cuda' (built for it: "
                f"TORCH_CUDA_ARCH_LIST={major}.{minor}, docs/cuda.md) or 'reference'"
            )
    return None


def check_backend_name(backend):
    """Refuse a backend name that is neither "auto" nor one of BACKENDS (whether it can run is
    decided per call, from the tensors' device)."""
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")


def available_backends(device):
    """Names of the backends usable for tensors on `device` (a torch.device or a string)."""
    device = torch.device(device)
    return [name for name in BACKENDS if unavailable_reason(name, device) is None]


def head_reason(name, classes, device, emb=None):
    """None if backend `name` runs the head for `classes` classes (None: no head) and `emb`
    features per pair (None: not known yet) on `device`, else why not, naming the backends that
    can."""
    if name != "triton" or classes is None:
        return None
    if classes > TRITON_MAX_CLASSES:
        why = (f"the Triton kernels are sized for up to {TRITON_MAX_CLASSES} classes and the weight has {classes} "
               "(their tiles would need more shared memory than a GPU has)")
    elif emb == 0:  # logits = bias: nothing for the kernels to do, and their split of the rows has no rows
        why = "the Triton kernels need at least one feature per pair and hs has none (E=0)"
    else:
        return None
    return f"{why}; use {'cuda' if device.type == 'cuda' else 'cpp'!r} or 'reference'"


def resolve(backend, device, classes=None, emb=None):
    """The implementation module for `backend` on `device`, for a head of `classes` classes (None:
    the losses alone) and `emb` features per pair; "auto" picks the fastest available."""
    if backend == "auto":
        for name in AUTO_ORDER.get(device.type, ("reference",)):
            if unavailable_reason(name, device) is None and head_reason(name, classes, device, emb) is None:
                return _IMPLEMENTATIONS[name]
    check_backend_name(backend)
    reason = unavailable_reason(backend, device) or head_reason(backend, classes, device, emb)
    if reason is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")
    return _IMPLEMENTATIONS[backend]


# The implementations are imported here, not on first use: torch.compile cannot import a module
# while it traces a call. Triton (slow to import) only where it can run: CUDA or the interpreter.
_IMPLEMENTATIONS = {"reference": _reference_backend, "cpp": _extension, "cuda": _extension}
TRITON_IMPORT_ERROR = None
if TRITON_INSTALLED and (TRITON_INTERPRET or torch.cuda.is_available()):
    try:
        _IMPLEMENTATIONS["triton"] = importlib.import_module("ncrl_kernels.triton_kernels.backend")
    except Exception as exc:  # a broken Triton install must not break `import ncrl_kernels`
        TRITON_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"
