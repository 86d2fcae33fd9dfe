"""The backend matrix: every available backend against the fp64 reference, for the losses, the
head, the fused head + loss and all gradients, over reductions, loss settings, symmetric, dtypes
and odd shapes. A new backend joins by appearing in ``available_backends``."""
import pytest
import torch

import ncrl_kernels
from ncrl_kernels import reference

from conftest import (
    RESULT_NAMES,
    all_backends,
    assert_close,
    device_params,
    dtypes_for,
    fp64,
    fused_backends,
    leaves,
    make_head_inputs,
    make_labels,
    make_logits,
    run_fused,
    upstream,
)

pytestmark = pytest.mark.usefixtures("ieee_fp32")

LOSS_CONFIGS = [
    pytest.param("ncrl", 0.0, True, id="ncrl"),
    pytest.param("ncrl", 0.05, True, id="ncrl-gamma0.05"),
    pytest.param("ncrl", 0.3, False, id="ncrl-gamma0.3-noreg"),
    pytest.param("atl", 0.0, False, id="atl"),
    pytest.param("bce", 0.0, False, id="bce"),
]
REDUCTIONS = ["mean", "sum", "none"]
# (N, E, B, C): a general case, the smallest (N=1, C=2, E=B, one group), and several pair tiles.
SHAPES = [
    pytest.param((45, 64, 16, 9), id="N45-E64-B16-C9"),
    pytest.param((1, 8, 8, 2), id="N1-E8-B8-C2"),
    pytest.param((300, 32, 8, 5), id="N300-E32-B8-C5"),
]


def check_fused(device, backend, shape, dtype, *, symmetric=False, loss="ncrl", gamma=0.0, margin_reg=True,
                reduction="mean", scale=1.0, bias=True):
    n, emb, block, classes = shape
    hs, ts, weight, b, labels = make_head_inputs(n, emb, block, classes, dtype=dtype, device=device,
                                                 scale=scale, bias=bias)
    kw = dict(block_size=block, symmetric=symmetric, loss=loss, gamma=gamma, margin_reg=margin_reg,
              reduction=reduction)
    got = run_fused(backend, *leaves(hs, ts, weight, b), labels, **kw)
    want = run_fused("reference", *fp64(hs, ts, weight, b), labels.cpu(), **kw)
    assert got[0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert got[1].dtype == dtype and not got[1].requires_grad
    for name, a, e in zip(RESULT_NAMES, got, want):
        assert_close(a, e, dtype, f"{backend} {name}")
    return got


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("loss,gamma,margin_reg", LOSS_CONFIGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_fused_settings(device, backend, loss, gamma, margin_reg, reduction, symmetric):
    check_fused(device, backend, (45, 64, 16, 9), torch.float32, symmetric=symmetric, loss=loss, gamma=gamma,
                margin_reg=margin_reg, reduction=reduction)


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_fused_shapes_and_dtypes(device, backend, shape, symmetric):
    for dtype in dtypes_for(device, backend):
        check_fused(device, backend, shape, dtype, symmetric=symmetric, gamma=0.05)


@pytest.mark.parametrize("device,backend", fused_backends())
def test_fused_without_bias(device, backend):
    check_fused(device, backend, (45, 64, 16, 9), torch.float32, bias=False)


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_head_matches_reference(device, backend, shape, symmetric):
    n, emb, block, classes = shape
    for dtype in dtypes_for(device, backend):
        hs, ts, weight, bias, _ = make_head_inputs(n, emb, block, classes, dtype=dtype, device=device)
        outs = []
        for name, args in ((backend, leaves(hs, ts, weight, bias)), ("reference", fp64(hs, ts, weight, bias))):
            logits = ncrl_kernels.group_bilinear(*args, block_size=block, symmetric=symmetric, backend=name)
            outs.append((logits, *torch.autograd.grad(logits, args, upstream(logits))))
        assert outs[0][0].dtype == dtype
        for what, a, e in zip(("logits", "d_hs", "d_ts", "d_weight", "d_bias"), *outs):
            assert_close(a, e, dtype, f"{backend} head {what} {dtype}")


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("loss,gamma,margin_reg", LOSS_CONFIGS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_matches_reference(device, backend, loss, gamma, margin_reg, reduction):
    for dtype in dtypes_for(device, backend):
        logits = make_logits(33, 7, dtype=dtype, device=device)
        labels = make_labels(33, 7).to(device)
        outs = []
        for name, f in ((backend, leaves(logits)[0]), ("reference", fp64(logits)[0])):
            value = reference_or_api(name, f, labels.to(f.device), loss, gamma, margin_reg, reduction)
            outs.append((value, *torch.autograd.grad(value, f, upstream(value))))
        assert outs[0][0].dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        assert outs[0][1].dtype == dtype
        for what, a, e in zip(("loss", "d_logits"), *outs):
            assert_close(a, e, dtype, f"{backend} {loss} {what} {dtype}")


def reference_or_api(backend, logits, labels, loss, gamma, margin_reg, reduction):
    if loss == "ncrl":
        return ncrl_kernels.ncrl_loss(logits, labels, gamma=gamma, margin_reg=margin_reg, reduction=reduction,
                                      backend=backend)
    fn = ncrl_kernels.atl_loss if loss == "atl" else ncrl_kernels.bce_loss
    return fn(logits, labels, reduction=reduction, backend=backend)


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("loss,gamma,margin_reg", LOSS_CONFIGS)
def test_logits_at_60_stay_finite(device, backend, loss, gamma, margin_reg):
    logits = torch.tensor([[60.0, -60.0, 60.0, 0.0], [-60.0, 60.0, -60.0, 60.0], [0.0, 60.0, 60.0, -60.0]],
                          device=device, requires_grad=True)
    labels = torch.tensor([[0.0, 1.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]], device=device)
    value = reference_or_api(backend, logits, labels, loss, gamma, margin_reg, "sum")
    (grad,) = torch.autograd.grad(value, logits)
    want = reference.loss_fn(logits.detach().double().cpu(), labels.cpu(), loss, gamma, margin_reg, "sum")
    assert torch.isfinite(value) and torch.isfinite(grad).all()
    assert value.item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("loss,gamma,margin_reg", LOSS_CONFIGS)
def test_fused_large_logits(device, backend, loss, gamma, margin_reg):
    # Weights scaled so logits reach +-60: sigmoids saturate, losses and gradients stay finite.
    got = check_fused(device, backend, (45, 64, 16, 9), torch.float32, loss=loss, gamma=gamma,
                      margin_reg=margin_reg, scale=40.0)
    assert got[1].abs().max() > 30


@pytest.mark.parametrize("device,backend", fused_backends())
def test_fp16_gradients_under_a_loss_scale(device, backend):
    """fp16 with a GradScaler's incoming gradient (its scale starts at 2**16 and grows) on a mean
    loss whose d loss / d logits is all below fp16's smallest subnormal: margins of about 18 (from
    the bias), divided by N. The scale must reach it before its rounding to fp16, as in eager
    autocast, or every gradient would be zero."""
    hs, ts, weight, _, labels = make_head_inputs(16, 16, 4, 5, dtype=torch.float16, device=device, scale=0.05)
    labels.zero_()
    labels[:, 0] = 1
    bias = torch.tensor([9.0, -9.0, -9.0, -9.0, -9.0], device=device)
    kw = dict(block_size=4, reduction="mean")
    got, want = leaves(hs, ts, weight, bias), fp64(hs, ts, weight, bias)
    loss_scale = 2.0**20
    (ncrl_kernels.fused_ncrl(*got, labels, backend=backend, **kw) * loss_scale).backward()
    (ncrl_kernels.fused_ncrl(*want, labels.cpu(), backend="reference", **kw) * loss_scale).backward()
    logits = ncrl_kernels.group_bilinear(*fp64(hs, ts, weight, bias), block_size=4, backend="reference")
    dlogits, = torch.autograd.grad(ncrl_kernels.ncrl_loss(logits, labels.cpu(), backend="reference"), logits)
    assert dlogits.abs().max() < 2**-25  # rounds to zero in fp16
    for name, a, e in zip(("d_hs", "d_ts", "d_weight", "d_bias"), got, want):
        size = e.grad.abs().max()  # compared relative to their own size, all well under 1
        assert_close(a.grad / size, e.grad / size, torch.float16, f"{backend} {name}")
    # d bias (fp32, as the bias) is summed from d loss / d logits in fp32: without the scale too.
    got, want = leaves(hs, ts, weight, bias), fp64(hs, ts, weight, bias)
    ncrl_kernels.fused_ncrl(*got, labels, backend=backend, **kw).backward()
    ncrl_kernels.fused_ncrl(*want, labels.cpu(), backend="reference", **kw).backward()
    size = want[3].grad.abs().max()
    assert_close(got[3].grad / size, want[3].grad / size, torch.float32, f"{backend} unscaled d_bias")


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_batch(device, backend, reduction):
    hs, ts, weight, bias, labels = make_head_inputs(0, 32, 8, 5, device=device)
    params = leaves(hs, ts, weight, bias)
    value, logits = ncrl_kernels.fused_ncrl(*params, labels, block_size=8, reduction=reduction,
                                            return_logits=True, backend=backend)
    assert logits.shape == (0, 5)
    assert value.shape == ((0,) if reduction == "none" else ())
    grads = torch.autograd.grad(value.sum(), params)
    if reduction != "none":
        assert value.item() == 0.0
    assert grads[0].shape == (0, 32) and all((g == 0).all() for g in grads)
    f = leaves(make_logits(0, 5, device=device))[0]
    value = ncrl_kernels.ncrl_loss(f, labels, reduction=reduction, backend=backend)
    assert value.sum().item() == 0.0 and torch.autograd.grad(value.sum(), f)[0].shape == (0, 5)


@pytest.mark.parametrize("device,backend", all_backends())
def test_bool_and_int_labels(device, backend):
    hs, ts, weight, bias, labels = make_head_inputs(20, 32, 8, 5, device=device)
    want = ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels, block_size=8, backend=backend)
    for as_type in (torch.bool, torch.int64, torch.uint8):
        got = ncrl_kernels.fused_ncrl(hs, ts, weight, bias, labels.to(as_type), block_size=8, backend=backend)
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        got = ncrl_kernels.atl_loss(hs @ hs.T[:, :5], labels.to(as_type), backend=backend)
        assert got.item() == pytest.approx(ncrl_kernels.atl_loss(hs @ hs.T[:, :5], labels, backend=backend).item())


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("loss", ["ncrl", "atl", "bce"])
def test_labels_never_mutated(device, backend, loss):
    hs, ts, weight, bias, labels = make_head_inputs(20, 32, 8, 5, device=device)
    before = labels.clone()
    value = ncrl_kernels.fused_ncrl(*leaves(hs, ts, weight, bias), labels, block_size=8, loss=loss, backend=backend)
    value.backward()
    reference_or_api(backend, make_logits(20, 5, device=device), labels, loss, 0.0, True, "mean")
    assert torch.equal(labels, before)


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("n", [1, 20])
def test_inputs_never_mutated(device, backend, n):
    """N == 1 included: there a [1, C] view of the bias passes for contiguous [N, C] logits."""
    hs, ts, weight, bias, labels = make_head_inputs(n, 32, 8, 5, device=device)
    params = leaves(hs, ts, weight, bias)
    before = [p.detach().clone() for p in params]
    value = ncrl_kernels.fused_ncrl(*params, labels, block_size=8, backend=backend)
    logits = ncrl_kernels.group_bilinear(*params, block_size=8, backend=backend)
    (value + logits.sum()).backward()
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b)


@pytest.mark.parametrize("device,backend", fused_backends())
def test_non_contiguous_inputs(device, backend):
    n, emb, block, classes = 40, 32, 8, 5
    hs, ts, weight, bias, labels = make_head_inputs(n, emb, block, classes, device=device)
    # Views with a stride of 2 along the last dimension (and transposed storage for hs).
    strided = lambda x: torch.stack([x, x], -1)[..., 0]  # noqa: E731
    hs_nc = strided(hs.T).T
    ts_nc, w_nc, b_nc, y_nc = strided(ts), strided(weight), strided(bias), strided(labels)
    assert not any(x.is_contiguous() for x in (hs_nc, ts_nc, w_nc, b_nc, y_nc))
    kw = dict(block_size=block, symmetric=True, backend=backend)
    got = run_fused(backend, *leaves(hs_nc, ts_nc, w_nc, b_nc), y_nc, block_size=block, symmetric=True)
    want = run_fused(backend, *leaves(hs, ts, weight, bias), labels, block_size=block, symmetric=True)
    for name, a, e in zip(RESULT_NAMES, got, want):
        assert_close(a, e, torch.float32, f"non-contiguous {name}")
    logits = ncrl_kernels.group_bilinear(hs_nc, ts_nc, w_nc, b_nc, **kw)
    assert_close(logits, want[1], torch.float32, "non-contiguous head")
    value = ncrl_kernels.ncrl_loss(logits.T.contiguous().T, y_nc, backend=backend)
    assert_close(value, want[0], torch.float32, "non-contiguous loss")


@pytest.mark.parametrize("device,backend", fused_backends())
@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
def test_bitwise_deterministic(device, backend, symmetric):
    hs, ts, weight, bias, labels = make_head_inputs(300, 32, 8, 5, device=device)
    first, second = (run_fused(backend, *leaves(hs, ts, weight, bias), labels, block_size=8, symmetric=symmetric)
                     for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", device_params())
@pytest.mark.parametrize("num_labels", [-1, 0, 1, 3, 100])
def test_predict(device, num_labels):
    logits = make_logits(50, 9, device=device)
    logits[0] = 0.0  # all tied with the threshold: no relation
    logits[1, 0] = -100.0  # everything above the threshold
    got = ncrl_kernels.predict(logits, num_labels=num_labels)
    want = reference.predict(logits.cpu().double(), num_labels)
    assert got.dtype == logits.dtype and got.device.type == device
    assert torch.equal(got.cpu().double(), want)
    assert (got.sum(1) >= 1).all() and got[0].tolist() == [1.0] + [0.0] * 8
    if num_labels > 0:
        assert (got[:, 1:].sum(1) <= num_labels).all()


@pytest.mark.parametrize("device", device_params())
def test_predict_with_a_global_threshold(device):
    """A model trained with bce_loss learns no none-class score: `threshold` takes f_0's place and
    column 0 is not read; the top-k limit still counts the threshold's column, as with f_0."""
    logits = make_logits(50, 9, device=device)
    for threshold in (0.0, 0.7):
        got = ncrl_kernels.predict(logits, threshold=threshold)
        want = (logits[:, 1:] > threshold).to(logits.dtype)
        assert torch.equal(got[:, 1:], want) and torch.equal(got[:, 0], (want.sum(1) == 0).to(logits.dtype))
        other_column_0 = logits.clone()
        other_column_0[:, 0] = 1e9
        assert torch.equal(ncrl_kernels.predict(other_column_0, threshold=threshold), got)
    thresholded = logits.clone()
    thresholded[:, 0] = 0.0
    assert torch.equal(ncrl_kernels.predict(logits, num_labels=2, threshold=0.0),
                       ncrl_kernels.predict(thresholded, num_labels=2))
    # bf16 logits against a threshold between two bf16 values: compared exactly, not on bf16's grid.
    bf16 = torch.tensor([[5.0, 0.703125, 0.69921875]], dtype=torch.bfloat16, device=device)
    got = ncrl_kernels.predict(bf16, threshold=0.7015)
    assert got.dtype == torch.bfloat16 and got.tolist() == [[0.0, 1.0, 0.0]]


@pytest.mark.parametrize("device,backend", fused_backends())
def test_symmetric_exact_ties_split_the_gradient(device, backend):
    # ts == hs makes every product pair a tie (hs_i ts_j == hs_j ts_i exactly): each gets half of
    # the feature's gradient, as torch.maximum does; the diagonal keeps its full gradient.
    hs, _, weight, bias, labels = make_head_inputs(30, 32, 8, 5, device=device)
    ts = hs.clone()
    kw = dict(block_size=8, symmetric=True)
    got = run_fused(backend, *leaves(hs, ts, weight, bias), labels, **kw)
    want = run_fused("reference", *fp64(hs, ts, weight, bias), labels.cpu(), **kw)
    for name, a, e in zip(RESULT_NAMES, got, want):
        assert_close(a, e, torch.float32, f"{backend} ties {name}")


@pytest.mark.parametrize("device,backend", all_backends())
def test_inference_tensor_inputs_train_the_head(device, backend):
    """hs and ts made under torch.inference_mode() (features cached from a frozen encoder), then
    used outside it to train the head: autograd cannot save inference tensors for backward, so the
    fused ops save copies, and the weight and bias get the reference's gradients."""
    hs, ts, weight, bias, labels = make_head_inputs(6, 8, 4, 3, device=device)
    with torch.inference_mode():
        frozen_hs, frozen_ts = hs.clone(), ts.clone()
    want = run_fused("reference", *fp64(hs, ts, weight, bias), labels.cpu(), block_size=4)
    w, b = leaves(weight, bias)
    value = ncrl_kernels.fused_ncrl(frozen_hs, frozen_ts, w, b, labels, block_size=4, backend=backend)
    grads = torch.autograd.grad(value, (w, b), upstream(value))
    for name, got, expected in zip(("loss", "d weight", "d bias"), (value, *grads), (want[0], *want[4:])):
        assert_close(got, expected, torch.float32, f"{backend} inference-tensor inputs {name}")
    head = ncrl_kernels.group_bilinear(frozen_hs, frozen_ts, w, b, block_size=4, backend=backend)
    head.sum().backward()
    assert w.grad is not None and b.grad is not None


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
def test_without_autograd(device, backend, mode):
    """Evaluation: under torch.inference_mode() (outputs are inference tensors) or no_grad with
    inputs that require grad, on several pair tiles (kernels on worker threads)."""
    hs, ts, weight, bias, labels = make_head_inputs(300, 32, 8, 5, device=device)
    want = run_fused("reference", *fp64(hs, ts, weight, bias), labels.cpu(), block_size=8)
    context = torch.inference_mode() if mode == "inference_mode" else torch.no_grad()
    args = leaves(hs, ts, weight, bias) if mode == "no_grad" else (hs, ts, weight, bias)
    with context:
        value, logits = ncrl_kernels.fused_ncrl(*args, labels, block_size=8, return_logits=True, backend=backend)
        head = ncrl_kernels.group_bilinear(*args, block_size=8, backend=backend)
        loss = ncrl_kernels.ncrl_loss(head, labels, backend=backend)
    for name, got, expected in (("loss", value, want[0]), ("logits", logits, want[1]), ("head", head, want[1]),
                                ("loss on logits", loss, want[0])):
        assert not got.requires_grad
        assert_close(got, expected, torch.float32, f"{backend} {mode} {name}")
