"""CUDA-specific checks of the "cuda" backend; the backend matrix (test_backends.py) covers the math
on small shapes. Here: several pair tiles and odd block sizes against the reference, bitwise
determinism across tiles, memory bounded by the pair tile, launches on the current stream without
synchronising it (CUDA graph capture), another device than the current one, and the C++ device
checks of direct op calls. Skipped without a GPU or without the extension's CUDA kernels."""
import pytest
import torch

import ncrl_kernels

from conftest import cuda_peak_extra_mib, leaves, make_head_inputs, run_fused
from test_backends import check_fused

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.usefixtures("ieee_fp32"),
    pytest.mark.skipif(
        not torch.cuda.is_available() or "cuda" not in ncrl_kernels.available_backends("cuda"),
        reason="needs a CUDA device and the extension built with its CUDA kernels",
    ),
]

MiB = 1 << 20

# (N, E, B, C). The CUDA kernels tile pairs so that one [tile, groups * B*B] slice of features (or of
# their gradient, fp32 for 16-bit inputs) holds 32 MiB: for B = 64, 2048 pairs of fp32 (4096 of bf16
# features in the forward), so 5000 pairs take 2-3 tiles; with fewer pairs than that, several groups
# share one slice (B24: all 3; B320: 81 pairs and one group per slice).
SHAPES = [
    pytest.param((5000, 64, 64, 7), id="tiles-of-pairs"),
    pytest.param((200, 320, 320, 3), id="B320-more-than-a-block-of-threads"),
    pytest.param((37, 72, 24, 5), id="B24-partial-warp-3-groups"),
    pytest.param((3, 4, 1, 2), id="B1"),
]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_tiles_and_block_sizes_match_reference(shape, symmetric):
    for dtype in (torch.float64, torch.float32, torch.float16, torch.bfloat16):
        check_fused("cuda", "cuda", shape, dtype, symmetric=symmetric, gamma=0.05)


@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_bitwise_deterministic_across_tiles(symmetric):
    hs, ts, weight, bias, labels = make_head_inputs(5000, 64, 64, 7, device="cuda")
    first, second = (run_fused("cuda", *leaves(hs, ts, weight, bias), labels, block_size=64, symmetric=symmetric)
                     for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_memory_bounded_by_pair_tile():
    """N = 16384, E = 256, B = 64: the [N, E*B] fp32 feature eager builds is 1 GiB (and its
    gradient another); the fused forward + backward needs the 32 MiB tile workspace, [N, C] logits
    and gradient rows, the [N, E] input gradients and cuBLAS' workspace."""
    n, emb, block, classes = 16384, 256, 64, 97
    hs, ts, weight, bias, labels = make_head_inputs(n, emb, block, classes, device="cuda")
    # Warm up so that cuBLAS' handle and workspace exist before measuring.
    run_fused("cuda", *leaves(hs[:64], ts[:64], weight, bias), labels[:64], block_size=block)
    params = leaves(hs, ts, weight, bias)
    extra = cuda_peak_extra_mib(
        lambda: ncrl_kernels.fused_ncrl(*params, labels, block_size=block, backend="cuda").backward())
    feature_mib = n * emb * block * 4 / MiB
    assert extra < 256, f"peak extra memory {extra:.0f} MiB (the eager feature alone: {feature_mib:.0f} MiB)"


def test_bf16_memory_has_no_fp32_copies_of_the_inputs():
    """DocRED's head in bf16 at N = 4096: what the fused forward + backward may hold beyond its inputs
    is the 32 MiB workspace, the fp32 weight gradient and its bf16 result, the bf16 input gradients
    and O(N C) rows. An fp32 copy of the weight (18 MiB) or of hs and ts (24 MiB) would not fit."""
    n, emb, block, classes = 4096, 768, 64, 97
    hs, ts, weight, bias, labels = make_head_inputs(n, emb, block, classes, dtype=torch.bfloat16, device="cuda")
    run_fused("cuda", *leaves(hs[:64], ts[:64], weight, bias), labels[:64], block_size=block)  # cuBLAS warm-up
    params = leaves(hs, ts, weight, bias)
    extra = cuda_peak_extra_mib(
        lambda: ncrl_kernels.fused_ncrl(*params, labels, block_size=block, backend="cuda").backward())
    budget = {
        "workspace": 32 * MiB,
        "fp32 weight gradient": 4 * weight.numel(),
        "bf16 weight gradient": 2 * weight.numel(),
        "bf16 hs, ts gradients": 2 * 2 * hs.numel(),
        "rows, allocator rounding": 12 * MiB,
    }
    assert extra * MiB < sum(budget.values()), (
        f"peak extra memory {extra:.0f} MiB; budget {sum(budget.values()) / MiB:.0f} MiB: "
        + ", ".join(f"{k} {v / MiB:.1f}" for k, v in budget.items()))


@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_captured_in_cuda_graph_on_side_stream(symmetric):
    """Graph capture fails on any launch outside the capturing stream and on any synchronisation,
    so a captured replay that matches eager shows the kernels run on the current stream and never
    sync it."""
    hs, ts, weight, bias, labels = make_head_inputs(3000, 64, 64, 7, device="cuda")
    ops = torch.ops.ncrl_kernels

    def step():
        loss, logits, dlogits = ops.fused_forward(hs, ts, weight, bias, labels, 64, symmetric, "ncrl", 0.05, True,
                                                  "mean")
        return (loss, logits, *ops.head_backward(dlogits, hs, ts, weight, 64, symmetric, True, True))

    want = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up on the side stream (cuBLAS handle, allocator), as capture requires
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        got = step()
    graph.replay()
    torch.cuda.synchronize()
    for a, e in zip(got, want):
        assert torch.equal(a, e)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_inputs_on_another_device_than_the_current():
    current = torch.cuda.current_device()
    other = (current + 1) % torch.cuda.device_count()
    check_fused(f"cuda:{other}", "cuda", (300, 64, 16, 9), torch.float32, symmetric=True)
    assert torch.cuda.current_device() == current


def test_direct_op_calls_check_devices():
    hs, ts, weight, bias, labels = make_head_inputs(10, 16, 4, 3, device="cuda")
    ops = torch.ops.ncrl_kernels
    with pytest.raises(RuntimeError, match="labels must be on"):
        ops.fused_forward(hs, ts, weight, bias, labels.cpu(), 4, False, "ncrl", 0.0, True, "mean")
    with pytest.raises(RuntimeError, match="must be on one device"):
        ops.head_forward(hs, ts, weight.cpu(), bias, 4, False)


def test_bf16_slices_at_docred_size():
    """The tile plan of docs/cuda.md at N = 1024, E = 768, B = 64 in bf16: the forward builds its
    features in 3 slices (1024 pairs x 4 groups in 32 MiB of bf16), the backward reduces dX and
    rebuilds features in 6 (1024 x 2 in fp32), where v1 took one slice per group (12)."""
    hs, ts, weight, bias, labels = make_head_inputs(1024, 768, 64, 97, dtype=torch.bfloat16, device="cuda")
    ops = torch.ops.ncrl_kernels
    grad = torch.randn(1024, 97, device="cuda")

    def launches():
        ops.head_forward(hs, ts, weight, bias, 64, False)
        ops.head_backward(grad, hs, ts, weight, 64, False, True, True)
        torch.cuda.synchronize()

    launches()  # cuBLAS warm-up
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        launches()
    names = [event.name for event in prof.events() if event.device_type == torch.autograd.DeviceType.CUDA]
    assert sum("build_features_kernel" in name for name in names) == 3 + 6
    assert sum("reduce_feature_grads_kernel" in name for name in names) == 6
