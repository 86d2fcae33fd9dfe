"""What is particular to the Triton backend (the shared backend matrix in test_backends.py holds it
to the reference like every other backend): its operators, shapes the matrix does not reach, the
TF32 switch, that its kernels compile for real GPUs, and, on a CUDA machine, DocRED-sized runs,
bitwise determinism, the memory bound, offsets past 2**31 and the autotune buckets."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import ncrl_kernels

from conftest import (
    RESULT_NAMES,
    assert_close,
    cuda_peak_extra_mib,
    fp64,
    leaves,
    make_head_inputs,
    make_labels,
    make_logits,
    run_fused,
)

pytestmark = pytest.mark.usefixtures("ieee_fp32")

CUDA = torch.cuda.is_available()
DOCRED = (4096, 768, 64, 97)


def triton_devices():
    return [
        pytest.param(dev, id=dev, marks=[pytest.mark.gpu] if dev == "cuda" else [])
        for dev in ("cpu", "cuda")
        if "triton" in ncrl_kernels.available_backends(dev) if dev == "cpu" or CUDA
    ]


def backend_module():
    from ncrl_kernels.triton_kernels import backend

    return backend


def check_against_reference(device, shape, dtype, **kw):
    n, emb, block, classes = shape
    hs, ts, weight, bias, labels = make_head_inputs(n, emb, block, classes, dtype=dtype, device=device)
    got = run_fused("triton", *leaves(hs, ts, weight, bias), labels, block_size=block, **kw)
    want = run_fused("reference", *fp64(hs, ts, weight, bias, same_device=True), labels, block_size=block, **kw)
    for name, a, e in zip(RESULT_NAMES, got, want):
        assert_close(a, e, dtype, f"{shape} {dtype} {name}")


# On the interpreter (CPU) and on CUDA.


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
@pytest.mark.parametrize("shape", [
    pytest.param((19, 24, 12, 7), id="B12-not-a-power-of-two"),
    pytest.param((17, 6, 2, 3), id="B2-padded-to-16"),
    pytest.param((5, 40, 40, 33), id="C33-padded-to-64"),
])
def test_shapes_with_padding(device, symmetric, shape):
    """Block sizes and class counts that are not powers of two or are below tl.dot's 16 are padded
    with masked zeros; nothing of the padding may leak into the results."""
    check_against_reference(device, shape, torch.float64, symmetric=symmetric, gamma=0.05, reduction="none")


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_gradcheck(device, symmetric):
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, dtype=torch.float64, device=device)
    fn = lambda h, t, w, b: ncrl_kernels.fused_ncrl(  # noqa: E731
        h, t, w, b, labels, block_size=4, symmetric=symmetric, gamma=0.05, reduction="none", backend="triton")
    assert torch.autograd.gradcheck(fn, leaves(hs, ts, weight, bias), fast_mode=True)
    logits = leaves(make_logits(6, 3, dtype=torch.float64, device=device))
    for loss_fn in (ncrl_kernels.ncrl_loss, ncrl_kernels.atl_loss, ncrl_kernels.bce_loss):
        assert torch.autograd.gradcheck(lambda f: loss_fn(f, labels, backend="triton"), logits, fast_mode=True)


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("allow_tf32", [False, True])
def test_tf32_follows_torch(device, allow_tf32, monkeypatch):
    """fp32 matmuls use TF32 exactly when torch.backends.cuda.matmul.allow_tf32 says so (the
    interpreter ignores the precision, so this checks what reaches the operators)."""
    backend = backend_module()
    seen = []
    for name in ("head_forward", "fused_forward"):
        op = getattr(backend, name)
        monkeypatch.setattr(backend, name, lambda *args, _op=op: seen.append(args[-1]) or _op(*args))
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    hs, ts, weight, bias, labels = make_head_inputs(4, 8, 4, 3, device=device)
    ncrl_kernels.group_bilinear(hs, ts, weight, bias, block_size=4, backend="triton")
    ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=4, backend="triton")
    assert seen == [allow_tf32, allow_tf32]


def autotune_cases():
    from ncrl_kernels.triton_kernels import head_backward, head_forward, loss_rows

    return [
        pytest.param(kernel, config, id=f"{kernel.fn.__name__}-{i}")
        for kernel, configs in ((head_forward.head_forward_kernel, head_forward.FORWARD_CONFIGS),
                                (head_backward.weight_grad_kernel, head_backward.WEIGHT_GRAD_CONFIGS),
                                (head_backward.input_grad_kernel, head_backward.INPUT_GRAD_CONFIGS),
                                (loss_rows.loss_kernel, loss_rows.LOSS_CONFIGS))
        for i, config in enumerate(configs)
    ]


@pytest.mark.parametrize("device", triton_devices())
@pytest.mark.parametrize("kernel,config", autotune_cases())
def test_every_autotune_config(device, kernel, config, monkeypatch):
    """Results must not depend on the config the autotuner picks (the other tests run each
    kernel's first, NCRL_TRITON_AUTOTUNE=0). On CUDA at DocRED size in bf16; the interpreter
    ignores warps and stages but runs each config's tile sizes."""
    monkeypatch.setattr(kernel, "configs", [config])
    monkeypatch.setattr(kernel, "cache", {})
    shape, dtype = (DOCRED, torch.bfloat16) if device == "cuda" else ((300, 32, 8, 5), torch.float32)
    check_against_reference(device, shape, dtype, symmetric=True, gamma=0.05)
    logits = make_logits(shape[0], shape[3], device=device)
    labels = make_labels(shape[0], shape[3]).to(device)
    for loss_fn in (ncrl_kernels.ncrl_loss, ncrl_kernels.atl_loss, ncrl_kernels.bce_loss):
        want = loss_fn(logits.double(), labels, backend="reference")
        assert_close(loss_fn(logits, labels, backend="triton"), want, torch.float32, loss_fn.__name__)


def test_pair_buckets():
    """A new N reuses the tuned config of its power-of-two bucket; the buckets are clamped."""
    from ncrl_kernels.triton_kernels._common import pair_bucket

    assert [pair_bucket(n) for n in (1, 256, 257, 3000, 4096, 4097, 10**6)] == [256, 256, 512, 4096, 4096, 8192,
                                                                                 16384]


def triton_compiles_for_nvidia():
    if importlib.util.find_spec("triton") is None:
        return False
    from triton.backends import backends

    return "nvidia" in backends


@pytest.mark.skipif(not triton_compiles_for_nvidia(), reason="Triton's NVIDIA backend is not installed")
def test_kernels_compile_for_gpu():
    """Every kernel variant compiles for sm_90 with the installed Triton (no GPU needed: Triton
    bundles ptxas). The interpreter checks what the kernels compute, not that they compile."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-W", "ignore", "-m", "ncrl_kernels.triton_kernels.compile_check", "--dtypes", "fp32", "tf32", "bf16",
         "--emb", "64", "--block", "16", "--classes", "9"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-5000:]
    assert "0 failed" in result.stdout


# CUDA only.

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs CUDA")


def docred_inputs(dtype=torch.float32, n=DOCRED[0]):
    _, emb, block, classes = DOCRED
    return make_head_inputs(n, emb, block, classes, dtype=dtype, device="cuda", label_rate=0.03)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_docred_shape_against_reference(dtype, symmetric):
    check_against_reference("cuda", DOCRED, dtype, symmetric=symmetric, gamma=0.05)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_docred_autocast_bf16(symmetric):
    """ATLOP's setting: fp32 parameters, bf16 autocast; the loss in fp32."""
    hs, ts, weight, bias, labels = docred_inputs()
    args = leaves(hs, ts, weight, bias)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = run_fused("triton", *args, labels, block_size=DOCRED[2], symmetric=symmetric)
    want = run_fused("reference", *fp64(*(x.to(torch.bfloat16) for x in (hs, ts, weight)), bias, same_device=True),
                            labels, block_size=DOCRED[2], symmetric=symmetric)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.bfloat16
    for name, a, e in zip(RESULT_NAMES, got, want):
        assert_close(a, e, torch.bfloat16, f"autocast {name}")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_docred_bitwise_deterministic(dtype, symmetric):
    hs, ts, weight, bias, labels = docred_inputs(dtype)
    runs = [run_fused("triton", *leaves(hs, ts, weight, bias), labels, block_size=DOCRED[2], symmetric=symmetric)
            for _ in range(3)]
    for later in runs[1:]:
        for a, b in zip(runs[0], later):
            assert torch.equal(a, b)


@pytest.mark.gpu
@needs_cuda
def test_docred_compiled_training_step():
    """torch.compile (Inductor, fullgraph) of an ATLOP-style step under bf16 autocast: the triton
    ops trace without a graph break and give eager's loss and gradients."""
    torch._dynamo.reset()
    hs, ts, weight, bias, labels = docred_inputs()

    def step(hs, ts, weight, bias):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            return ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=DOCRED[2], gamma=0.05,
                                           backend="triton")

    eager_args, compiled_args = leaves(hs, ts, weight, bias), leaves(hs, ts, weight, bias)
    want = step(*eager_args)
    got = torch.compile(step, fullgraph=True)(*compiled_args)
    assert_close(got, want, torch.bfloat16, "compiled loss")
    for a, e in zip(torch.autograd.grad(got, compiled_args), torch.autograd.grad(want, eager_args)):
        assert_close(a, e, torch.bfloat16, "compiled grad")


@pytest.mark.gpu
@needs_cuda
def test_docred_memory_bound():
    """Peak extra memory of forward + backward: at most 5% of the unfused eager head's (which
    builds the [N, E*B] feature), the issue's target."""
    hs, ts, weight, bias, labels = docred_inputs()
    params = leaves(hs, ts, weight, bias)

    def step(backend):
        for p in params:
            p.grad = None
        ncrl_kernels.fused_ncrl(*params, labels, block_size=DOCRED[2], backend=backend).backward()

    step("triton")  # autotuning allocates benchmark buffers on the first call
    fused = cuda_peak_extra_mib(lambda: step("triton"))
    eager = cuda_peak_extra_mib(lambda: step("reference"))
    assert fused <= 0.05 * eager, f"fused {fused:.0f} MiB vs eager {eager:.0f} MiB"


@pytest.mark.gpu
@needs_cuda
def test_offsets_past_2_31():
    """N*E*B > 2**31 (the size of the feature the kernels never build): rows are independent and
    the weight gradient is a sum over rows, so the whole batch must agree with the same batch run
    in chunks."""
    _, emb, block, classes = DOCRED
    n = 2**31 // (emb * block) + 1000
    hs, ts, weight, bias, labels = docred_inputs(torch.bfloat16, n=n)
    kw = dict(block_size=block, reduction="sum")
    whole = run_fused("triton", *leaves(hs, ts, weight, bias), labels, **kw)
    chunk = 8192
    parts = [run_fused("triton", *leaves(hs[i:i + chunk], ts[i:i + chunk], weight, bias), labels[i:i + chunk],
                              **kw) for i in range(0, n, chunk)]
    joined = [
        sum(p[0].double() for p in parts),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
        torch.cat([p[3] for p in parts]),
        sum(p[4].double() for p in parts),
        sum(p[5].double() for p in parts),
    ]
    for name, a, e in zip(RESULT_NAMES, whole, joined):
        assert_close(a, e, torch.bfloat16, f"N={n} {name}")


@pytest.mark.gpu
@needs_cuda
def test_new_n_reuses_the_tuned_config(monkeypatch):
    """The autotuner keys on the power-of-two bucket of N: a new N in a seen bucket is not
    re-tuned (and, N not being specialised on, not recompiled). The tests run with one config
    (NCRL_TRITON_AUTOTUNE=0), which Triton never tunes, so the forward gets all of its configs
    here."""
    from ncrl_kernels.triton_kernels import head_forward as module

    kernel = module.head_forward_kernel
    monkeypatch.setattr(kernel, "configs", module.FORWARD_CONFIGS)
    monkeypatch.setattr(kernel, "cache", {})
    tuned = None
    for n in (3000, 3001, 4096, 2049):  # all in the bucket 4096
        hs, ts, weight, bias, labels = docred_inputs(n=n)
        ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=DOCRED[2], backend="triton")
        if tuned is None:
            tuned = dict(kernel.cache)
            assert len(tuned) == 1, "the first call tunes once"
    assert kernel.cache == tuned