"""The reference against hand-derived values, its own gradients (gradcheck, fp64), and ATLOP's
original code path."""
import math

import pytest
import torch
import torch.nn.functional as F

from ncrl_kernels import reference

from conftest import make_head_inputs, make_labels, make_logits


def nll_sigmoid(x):
    return math.log1p(math.exp(-x))  # -log s(x)


def test_ncrl_hand_values():
    logits = torch.tensor([[0.0, 1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[0.0, 1.0, 0.0]], dtype=torch.float64)
    # k=1 positive margin 1; k=2 negative margin -1: -log(1 - s(-1)) = -log s(1);
    # regulariser: m0 = 0 - mean(1, -1) = 0, y0 = 0: -log(1 - s(0)) = log 2.
    expected = nll_sigmoid(1.0) + nll_sigmoid(1.0) + math.log(2.0)
    assert reference.ncrl_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)
    assert reference.ncrl_loss(logits, labels, margin_reg=False).item() == pytest.approx(2 * nll_sigmoid(1.0), rel=1e-12)
    # gamma = 0.05 shifts the negative side: -log(min(1 - s(m) + gamma, 1)).
    s = lambda x: 1.0 / (1.0 + math.exp(-x))  # noqa: E731
    shifted = nll_sigmoid(1.0) - math.log(1 - s(-1.0) + 0.05) - math.log(1 - s(0.0) + 0.05)
    assert reference.ncrl_loss(logits, labels, gamma=0.05).item() == pytest.approx(shifted, rel=1e-12)


def test_ncrl_margin_shift_zeroes_easy_negatives():
    # s(-5) = 0.0067 <= gamma: exactly zero loss and gradient for that negative.
    logits = torch.tensor([[0.0, -5.0]], dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    loss = reference.ncrl_loss(logits, labels, gamma=0.05, margin_reg=False)
    loss.backward()
    assert loss.item() == 0.0
    assert logits.grad.abs().sum().item() == 0.0


def test_ncrl_reductions_and_mean_over_pairs():
    logits, labels = make_logits(6, 5, dtype=torch.float64), make_labels(6, 5)
    per_pair = reference.ncrl_loss(logits, labels, reduction="none")
    assert per_pair.shape == (6,)
    assert reference.ncrl_loss(logits, labels, reduction="sum").item() == pytest.approx(per_pair.sum().item())
    # "mean" divides by N, not N*C.
    assert reference.ncrl_loss(logits, labels).item() == pytest.approx(per_pair.sum().item() / 6)


def test_atl_hand_value():
    logits = torch.tensor([[0.0, 1.0, -1.0, 2.0]], dtype=torch.float64)
    labels = torch.tensor([[0.0, 1.0, 0.0, 0.0]], dtype=torch.float64)
    # P = {0, 1}: -log softmax_P(f)_1; Q = {0, 2, 3}: -log softmax_Q(f)_0.
    expected = math.log1p(math.exp(-1.0)) + math.log(1 + math.exp(-1.0) + math.exp(2.0))
    assert reference.atl_loss(logits, labels).item() == pytest.approx(expected, rel=1e-12)


def atlop_original_atloss(logits, labels):
    """ATLOP's ATLoss.forward, verbatim (it mutates `labels`)."""
    th_label = torch.zeros_like(labels, dtype=torch.float)
    th_label[:, 0] = 1.0
    labels[:, 0] = 0.0
    p_mask = labels + th_label
    n_mask = 1 - labels
    logit1 = logits - (1 - p_mask) * 1e30
    loss1 = -(F.log_softmax(logit1, dim=-1) * labels).sum(1)
    logit2 = logits - (1 - n_mask) * 1e30
    loss2 = -(F.log_softmax(logit2, dim=-1) * th_label).sum(1)
    return (loss1 + loss2).mean()


def test_atl_matches_atlop_and_leaves_labels_alone():
    logits, labels = make_logits(20, 7), make_labels(20, 7)
    before = labels.clone()
    ours = reference.atl_loss(logits, labels)
    assert torch.equal(labels, before)
    assert ours.item() == pytest.approx(atlop_original_atloss(logits, labels.clone()).item(), rel=1e-6)


def test_bce_hand_value():
    logits = torch.tensor([[5.0, 1.0, -1.0]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    assert reference.bce_loss(logits, labels).item() == pytest.approx(2 * nll_sigmoid(1.0), rel=1e-12)


def test_head_matches_atlop_linear_on_the_feature():
    hs, ts, weight, bias, _ = make_head_inputs(5, 12, 4, 3, dtype=torch.float64)
    b1, b2 = hs.view(5, 3, 4), ts.view(5, 3, 4)
    bl = (b1.unsqueeze(3) * b2.unsqueeze(2)).view(5, 12 * 4)
    expected = F.linear(bl, weight, bias)
    torch.testing.assert_close(reference.group_bilinear(hs, ts, weight, bias, 4), expected)
    # Written out: logits[n, c] = b[c] + sum_{g,i,j} hs[n, gB+i] ts[n, gB+j] W[c, gBB + iB + j].
    n, c = 3, 2
    total = bias[c].item() + sum(
        hs[n, g * 4 + i].item() * ts[n, g * 4 + j].item() * weight[c, g * 16 + i * 4 + j].item()
        for g in range(3) for i in range(4) for j in range(4)
    )
    assert expected[n, c].item() == pytest.approx(total, rel=1e-12)


def test_symmetric_head_uses_the_larger_product():
    hs = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    ts = torch.tensor([[3.0, -1.0]], dtype=torch.float64)
    weight = torch.eye(4, dtype=torch.float64)  # logits = the 4 features of the single group
    feats = reference.group_bilinear(hs, ts, weight, None, 2, symmetric=True)
    # a_ij = h_i t_j = [[3, -1], [6, -2]]; max(a, a^T) = [[3, 6], [6, -2]].
    assert feats.tolist() == [[3.0, 6.0, 6.0, -2.0]]


def test_predict_hand_values():
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 3.0], [5.0, 1.0, 2.0, 3.0, 4.0]])
    assert reference.predict(logits).tolist() == [[0, 1, 1, 0, 1], [1, 0, 0, 0, 0]]
    # top-2 over all columns (column 0 included): row 0 keeps 2.0 and 3.0.
    assert reference.predict(logits, num_labels=2).tolist() == [[0, 0, 1, 0, 1], [1, 0, 0, 0, 0]]


@pytest.mark.parametrize("loss", ["ncrl", "atl", "bce"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_loss_gradcheck(loss, reduction):
    logits = make_logits(4, 5, dtype=torch.float64).requires_grad_()
    labels = make_labels(4, 5).double()
    for gamma, margin_reg in ([0.0, True], [0.05, True], [0.2, False]) if loss == "ncrl" else ([0.0, False],):
        fn = lambda f: reference.loss_fn(f, labels, loss, gamma, margin_reg, reduction)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (logits,))


@pytest.mark.parametrize("symmetric", [False, True])
def test_head_gradcheck(symmetric):
    hs, ts, weight, bias, _ = make_head_inputs(3, 8, 4, 3, dtype=torch.float64)
    args = [x.requires_grad_() for x in (hs, ts, weight, bias)]
    fn = lambda h, t, w, b: reference.group_bilinear(h, t, w, b, 4, symmetric)  # noqa: E731
    assert torch.autograd.gradcheck(fn, args)


def test_stable_at_large_logits():
    logits = torch.tensor([[60.0, -60.0, 60.0], [-60.0, 60.0, -60.0]], requires_grad=True)
    labels = torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]])
    for name in ("ncrl", "atl", "bce"):
        value = reference.loss_fn(logits, labels, name, 0.05 if name == "ncrl" else 0.0)
        (grad,) = torch.autograd.grad(value, logits)
        assert torch.isfinite(value) and torch.isfinite(grad).all()
        assert grad.abs().sum() > 0  # saturated but still useful
