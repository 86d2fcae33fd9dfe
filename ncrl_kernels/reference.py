"""The pure-PyTorch reference: the numerical contract of docs/spec.md, written the way ATLOP and the
NCRL authors' code compute it (unfused: the ``[N, E*B]`` feature is built).

Every other backend is tested against these functions. They are also the ``"reference"`` backend
and the ``eager`` provider of the benchmarks, so they stay plain: no tiling, no custom autograd.
Arguments are assumed valid (the public API validates them first).
"""
import torch
import torch.nn.functional as F

__all__ = ["group_bilinear", "ncrl_loss", "atl_loss", "bce_loss", "predict", "loss_fn", "loss_dtype",
           "reduce_pairs", "head_dtype", "autocast_head", "LOSSES"]


def loss_dtype(dtype):
    """Losses accumulate in fp32 whatever the input dtype (fp64 stays fp64, for gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def as_dtype(x, dtype):
    """`x` in `dtype`: itself where it already is (the host-side helper of the fused paths: a no-op
    .to() still costs the host a dispatch, about 1 us on this project's CPU, on every step)."""
    return x if x.dtype == dtype else x.to(dtype)


def head_dtype(dtype, autocast):
    """The dtype a head input of `dtype` runs in under autocast to `autocast` (None: autocast off),
    as F.linear's: every floating dtype but fp64 is cast to the autocast dtype."""
    return dtype if autocast is None or dtype == torch.float64 else autocast


def autocast_head(hs, ts, weight, autocast):
    """hs, ts and weight in the dtypes the head runs in (head_dtype); the bias keeps its dtype and
    the loss stays fp32. Called after validation (a cast is a kernel)."""
    return tuple(x.to(head_dtype(x.dtype, autocast)) for x in (hs, ts, weight))


def reduce_pairs(per_pair, reduction):
    """Per-pair losses [N] -> the loss for `reduction`."""
    if reduction == "none":
        return per_pair
    total = per_pair.sum()
    # docs/spec.md: "mean" divides by the number of pairs N (not N*C); N == 0 gives 0, not NaN.
    return total / max(per_pair.shape[0], 1) if reduction == "mean" else total


def group_bilinear(hs, ts, weight, bias=None, block_size=64, symmetric=False):
    """ATLOP's group-bilinear head: ``F.linear(x, weight, bias)`` on the Kronecker feature x
    ([N, E*B]: per group of B columns, the outer product of hs's and ts's blocks), built whole."""
    n, emb = hs.shape
    groups = emb // block_size
    b1 = hs.reshape(n, groups, block_size)
    b2 = ts.reshape(n, groups, block_size)
    bl = b1.unsqueeze(3) * b2.unsqueeze(2)  # [N, G, B, B]: the feature fused backends never build
    if symmetric:
        bl = torch.maximum(bl, bl.transpose(2, 3))
    bias = None if bias is None else bias.to(weight.dtype)
    return F.linear(bl.reshape(n, emb * block_size), weight, bias)


def _margin_ce(margin, y, gamma):
    """``y * pos(m) + (1 - y) * neg(m; gamma)`` of docs/spec.md in stable form."""
    # logsigmoid is exact in the tails (F.softplus switches to the identity past 20).
    pos = -F.logsigmoid(margin)  # -log s(m)
    if gamma == 0.0:
        neg = -F.logsigmoid(-margin)  # -log(1 - s(m))
    else:
        # -log(min(1 - s(m) + gamma, 1)): zero (loss and gradient) where s(m) <= gamma.
        # 1 - s(m) = s(-m) keeps the log finite for large margins.
        shifted = -torch.log(torch.sigmoid(-margin) + gamma)
        neg = torch.where(torch.sigmoid(margin) > gamma, shifted, torch.zeros_like(shifted))
    return y * pos + (1.0 - y) * neg


def ncrl_loss(logits, labels, gamma=0.0, margin_reg=True, reduction="mean"):
    """None Class Ranking Loss (paper eq. 2, 5-7 with the official code's semantics)."""
    f = logits.to(loss_dtype(logits.dtype))
    y = labels.to(f.dtype)
    f0 = f[:, :1]
    per_pair = _margin_ce(f[:, 1:] - f0, y[:, 1:], gamma).sum(1)
    if margin_reg:
        # The mean runs over all K relation columns and is not detached.
        per_pair = per_pair + _margin_ce(f[:, 0] - f[:, 1:].mean(1), y[:, 0], gamma)
    return reduce_pairs(per_pair, reduction)


def atl_loss(logits, labels, reduction="mean"):
    """ATLOP's adaptive thresholding loss, without mutating ``labels``."""
    f = logits.to(loss_dtype(logits.dtype))
    y = labels.to(f.dtype, copy=True)
    th_label = torch.zeros_like(y)
    th_label[:, 0] = 1.0
    y[:, 0] = 0.0
    p_mask = y + th_label
    n_mask = 1.0 - y
    logit1 = f - (1.0 - p_mask) * 1e30
    loss1 = -(F.log_softmax(logit1, dim=-1) * y).sum(1)
    logit2 = f - (1.0 - n_mask) * 1e30
    loss2 = -(F.log_softmax(logit2, dim=-1) * th_label).sum(1)
    return reduce_pairs(loss1 + loss2, reduction)


def bce_loss(logits, labels, reduction="mean"):
    """Binary cross-entropy over the relation columns 1..K, summed per pair (column 0 unused)."""
    f = logits.to(loss_dtype(logits.dtype))
    y = labels.to(f.dtype)
    per_pair = F.binary_cross_entropy_with_logits(f[:, 1:], y[:, 1:], reduction="none").sum(1)
    return reduce_pairs(per_pair, reduction)


LOSSES = ("ncrl", "atl", "bce")


def loss_fn(logits, labels, loss="ncrl", gamma=0.0, margin_reg=True, reduction="mean"):
    """One entry point for the three losses; ``gamma``/``margin_reg`` only affect NCRL."""
    if loss == "ncrl":
        return ncrl_loss(logits, labels, gamma, margin_reg, reduction)
    if loss == "atl":
        return atl_loss(logits, labels, reduction)
    return bce_loss(logits, labels, reduction)


def with_threshold(scores, threshold):
    """`scores` with column 0 (the none class's score: each pair's threshold) replaced by one
    global threshold, for models that learn no none-class score (BCE)."""
    return torch.cat([torch.full_like(scores[:, :1], threshold), scores[:, 1:]], dim=1)


def predict(logits, num_labels=-1):
    """ATLOP/NCRL ``get_label``: classes scoring above the none class, optionally top-k only."""
    th_logit = logits[:, :1]
    mask = logits > th_logit
    if num_labels > 0:
        k = min(num_labels, logits.shape[1])
        top_v = torch.topk(logits, k, dim=1).values[:, -1:]
        mask = mask & (logits >= top_v)
    output = mask.to(logits.dtype)
    output[:, 0] = (output.sum(1) == 0.0).to(logits.dtype)
    return output
