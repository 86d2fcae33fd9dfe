"""nn.Module wrappers: ATLOP's bilinear weights load, results equal the functional API."""
import pytest
import torch
from torch import nn

import ncrl_kernels
from ncrl_kernels import reference

from conftest import all_backends, make_head_inputs, make_logits, make_labels

pytestmark = pytest.mark.usefixtures("ieee_fp32")


@pytest.mark.parametrize("device,backend", all_backends())
def test_group_bilinear_loads_atlop_bilinear(device, backend):
    emb, block, classes = 32, 8, 5
    atlop_bilinear = nn.Linear(emb * block, classes).to(device)  # ATLOP: self.bilinear
    head = ncrl_kernels.GroupBilinear(emb, block, classes, backend=backend, device=device)
    head.load_state_dict(atlop_bilinear.state_dict(), strict=True)
    hs, ts, *_ = make_head_inputs(9, emb, block, classes, device=device)
    b1, b2 = hs.view(9, emb // block, block), ts.view(9, emb // block, block)
    want = atlop_bilinear((b1.unsqueeze(3) * b2.unsqueeze(2)).view(9, emb * block))
    torch.testing.assert_close(head(hs, ts), want, rtol=1e-4, atol=1e-5)


def test_group_bilinear_initialises_like_linear():
    torch.manual_seed(0)
    linear = nn.Linear(64 * 8, 7)
    torch.manual_seed(0)
    head = ncrl_kernels.GroupBilinear(64, 8, 7)
    assert torch.equal(head.weight, linear.weight) and torch.equal(head.bias, linear.bias)
    assert ncrl_kernels.GroupBilinear(64, 8, 7, bias=False).bias is None
    with pytest.raises(ValueError, match="divisible"):
        ncrl_kernels.GroupBilinear(60, 8, 7)
    # Settings are checked when the module is built, each error naming its argument.
    for args, name in (((64, 0, 7), "block_size"), ((64, True, 7), "block_size"), ((64, 4.0, 7), "block_size"),
                       ((64, "4", 7), "block_size"), ((0, 4, 7), "emb_size"), ((64, 4, -1), "num_classes")):
        with pytest.raises(ValueError, match=f"{name} must be a positive int"):
            ncrl_kernels.GroupBilinear(*args)
    with pytest.raises(ValueError, match="at least 2 classes.*num_classes=1"):
        ncrl_kernels.GroupBilinearLoss(64, 8, 1)


@pytest.mark.parametrize("device,backend", all_backends())
def test_head_loss_module_matches_functional(device, backend):
    emb, block, classes = 32, 8, 5
    module = ncrl_kernels.GroupBilinearLoss(emb, block, classes, symmetric=True, gamma=0.05, backend=backend,
                                            device=device)
    hs, ts, _, _, labels = make_head_inputs(11, emb, block, classes, device=device)
    loss, logits = module(hs, ts, labels, return_logits=True)
    want = ncrl_kernels.fused_ncrl(hs, ts, module.weight, module.bias, labels, block_size=block, symmetric=True,
                                   gamma=0.05, backend=backend)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(module(hs, ts), logits)
    loss.backward()
    assert module.weight.grad is not None and module.bias.grad is not None


def test_ncrloss_module():
    logits, labels = make_logits(8, 4), make_labels(8, 4)
    module = ncrl_kernels.NCRLoss(gamma=0.05, margin_reg=False, reduction="sum")
    torch.testing.assert_close(module(logits, labels), reference.ncrl_loss(logits, labels, 0.05, False, "sum"))
    assert "gamma=0.05" in repr(module)


def test_modules_check_their_settings_when_built():
    """Bad settings fail when the module is built, not at its first forward."""
    with pytest.raises(ValueError, match="gamma"):
        ncrl_kernels.NCRLoss(gamma=1.5)
    with pytest.raises(ValueError, match="reduction"):
        ncrl_kernels.NCRLoss(reduction="avg")
    with pytest.raises(ValueError, match="backend"):
        ncrl_kernels.NCRLoss(backend="mkl")
    with pytest.raises(ValueError, match="backend"):
        ncrl_kernels.GroupBilinear(64, 8, 7, backend="foo")
    with pytest.raises(TypeError, match="symmetric"):
        ncrl_kernels.GroupBilinear(64, 8, 7, symmetric="False")
    with pytest.raises(ValueError, match="loss"):
        ncrl_kernels.GroupBilinearLoss(64, 8, 7, loss="ce")
    with pytest.raises(TypeError, match="margin_reg"):
        ncrl_kernels.GroupBilinearLoss(64, 8, 7, margin_reg="no")
    # The Triton head takes up to 128 classes on any device; "auto" picks another backend past that.
    with pytest.raises(ValueError, match=r"num_classes=129.*up to 128 classes.*'cpp' or 'reference'"):
        ncrl_kernels.GroupBilinearLoss(8, 4, 129, backend="triton", device="cpu")
    ncrl_kernels.GroupBilinear(8, 4, 128, backend="triton")
    ncrl_kernels.GroupBilinear(8, 4, 129, backend="auto")
