"""Shared test helpers: inputs, the backends to test, and tolerances against the fp64 reference.

Every backend available for a device joins the same parametrised tests. On a machine without a
GPU, Triton runs under its interpreter (TRITON_INTERPRET=1, set here before anything imports
triton), so CI checks the Triton kernels too.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never reach the Hugging Face hub (set before anything imports huggingface_hub).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

import ncrl_kernels  # noqa: E402
from ncrl_kernels import reference  # noqa: E402


def pytest_configure(config):
    """Refuse a Triton whose interpreter cannot run the kernels here, naming the fix. Triton 3.6's
    interpreter takes a loop bound's value as int() of a 1-element array, which numpy 2.4 refuses
    (Triton 3.7 squeezes it first): every Triton test would fail with a TypeError."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import numpy
        import triton
    except ImportError:
        return
    from ncrl_kernels._dispatch import major_minor

    if major_minor(triton.__version__) < (3, 7) and major_minor(numpy.__version__) >= (2, 4):
        raise pytest.UsageError(f"Triton {triton.__version__}'s interpreter cannot run with numpy {numpy.__version__}: "
                                "pip install 'numpy<2.4' or 'triton>=3.7'")


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_params():
    """devices() as test parameters, CUDA's marked gpu (make gpu-check runs -m gpu)."""
    return [pytest.param(dev, id=dev, marks=[pytest.mark.gpu] if dev == "cuda" else []) for dev in devices()]


def fused_backends():
    """(device, backend) pairs of every non-reference backend available here."""
    return [
        pytest.param(dev, name, id=f"{dev}-{name}", marks=[pytest.mark.gpu] if dev == "cuda" else [])
        for dev in devices()
        for name in ncrl_kernels.available_backends(dev)
        if name != "reference"
    ]


def all_backends():
    return [
        pytest.param(dev, name, id=f"{dev}-{name}", marks=[pytest.mark.gpu] if dev == "cuda" else [])
        for dev in devices()
        for name in ncrl_kernels.available_backends(dev)
    ]


# Per dtype: (rtol, atol relative to the largest reference magnitude). fp32 on the GPU may use
# TF32; tests that compare fp32 pin IEEE matmuls (see `ieee_fp32` below).
TOLERANCES = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-4, 2e-5),
    torch.float16: (2e-2, 5e-3),
    torch.bfloat16: (5e-2, 2e-2),
}


def dtypes_for(device, backend):
    """Every input dtype a backend takes; the Triton interpreter (CPU) has no bf16."""
    if backend == "triton" and device == "cpu":
        return [torch.float64, torch.float32, torch.float16]
    return [torch.float64, torch.float32, torch.float16, torch.bfloat16]


def assert_close(actual, expected, dtype, what=""):
    """Compare a backend result with the fp64 reference; atol scales with the result's size."""
    rtol, atol = TOLERANCES[dtype]
    expected = expected.detach().to(torch.float64).cpu()
    actual = actual.detach().to(torch.float64).cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item() if expected.numel() else 1.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol * max(scale, 1.0), msg=lambda m: f"{what}: {m}")


def make_head_inputs(n, emb, block, classes, *, dtype=torch.float32, device="cpu", seed=0, scale=1.0,
                     bias=True, label_rate=0.2):
    """hs, ts ~ tanh-range values, weight ~ nn.Linear init, multi-hot labels with column 0 set on
    rows without relations. Logits come out O(scale)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.rand(n, emb, generator=g, dtype=torch.float64) * 2 - 1
    ts = torch.rand(n, emb, generator=g, dtype=torch.float64) * 2 - 1
    weight = (torch.randn(classes, emb * block, generator=g, dtype=torch.float64) * scale
              * 3.0 / (emb * block) ** 0.5)
    b = torch.randn(classes, generator=g, dtype=torch.float64) * 0.1 if bias else None
    labels = make_labels(n, classes, seed=seed + 1, rate=label_rate)
    cast = lambda x: None if x is None else x.to(device=device, dtype=dtype)  # noqa: E731
    return cast(hs), cast(ts), cast(weight), cast(b), labels.to(device)


def make_labels(n, classes, *, seed=0, rate=0.2):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, classes, generator=g) < rate).float()
    labels[:, 0] = (labels[:, 1:].sum(1) == 0).float()
    return labels


def make_logits(n, classes, *, dtype=torch.float32, device="cpu", seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, classes, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)


def fp64(*tensors, same_device=False):
    """Detached fp64 leaf copies (requiring grad) for the reference side: on the CPU, or on the
    tensors' own device (the reference at DocRED size builds a [N, 49152] feature, which a GPU
    does in milliseconds)."""
    return [None if t is None else t.detach().to("cpu" if not same_device else t.device).double().requires_grad_()
            for t in tensors]


def leaves(*tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


def upstream(value, seed=3):
    """A random incoming gradient, so "none" reductions check the per-pair scaling too."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(value.shape, generator=g, dtype=torch.float64) + 0.5).to(value.device, value.dtype)


def run_fused(backend, hs, ts, weight, bias, labels, **kw):
    """(loss, logits, d hs, d ts, d weight[, d bias]) of fused_ncrl with a random upstream gradient."""
    value, logits = ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, return_logits=True, backend=backend, **kw)
    params = [x for x in (hs, ts, weight, bias) if x is not None]
    return (value, logits, *torch.autograd.grad(value, params, upstream(value)))


RESULT_NAMES = ("loss", "logits", "d_hs", "d_ts", "d_weight", "d_bias")


def cuda_peak_extra_mib(fn):
    """Peak CUDA memory `fn()` allocates beyond what is allocated when it starts, in MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


@pytest.fixture
def ieee_fp32():
    """Pin IEEE fp32 matmuls (no TF32) for tight comparisons, through PyTorch's new precision API
    only (reading the legacy flags raises once both APIs have been used)."""
    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "ieee"
    yield
    torch.backends.cuda.matmul.fp32_precision = old


__all__ = ["reference"]
