"""The per-row loss math of docs/spec.md on a tile of logits, the same formulas as csrc/loss_rows.h
(stable logistic pieces from one exp, gamma-shifted negatives, the undetached margin regulariser,
ATLOP's two masked softmaxes, BCE), vectorised over ``[pairs, classes]``.

``epilogue_kernel`` sums the forward's partial logits, adds the bias and runs ``loss_rows`` on
them; the loss-only op runs the same kernel on given logits, so both compute the loss and
d(loss)/d(logits) identically.
"""
import triton
import triton.language as tl

from ._common import ATL, BCE, COMPILE_OPTIONS, HEAD_ONLY, NCRL, cdiv, padded
from ._launch import launcher


@triton.jit
def _log1p_small(e):
    """log(1 + e) for e in [0, 1], accurate when e is tiny (log(1 + e) would round to 0). Triton
    has no portable log1p (libdevice's does not run under the interpreter), so this is the
    classic correction log(u) * e / (u - 1) with u = 1 + e, exact where u rounds to 1."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _logistic(x):
    """(sigmoid(x), sigmoid(-x), softplus(x), softplus(-x)) without cancellation or overflow."""
    e = tl.exp(-tl.abs(x))
    l1p = _log1p_small(e)
    big = 1.0 / (1.0 + e)  # sigmoid(|x|)
    small = e / (1.0 + e)  # sigmoid(-|x|)
    nonneg = x >= 0.0
    sig = tl.where(nonneg, big, small)
    sig_neg = tl.where(nonneg, small, big)
    sp = tl.maximum(x, 0.0) + l1p  # -log(1 - sigmoid(x))
    sp_neg = tl.maximum(-x, 0.0) + l1p  # -log(sigmoid(x))
    return sig, sig_neg, sp, sp_neg


@triton.jit
def _margin_ce(m, y, GAMMA: tl.constexpr):
    """ce(m, y; gamma) = y * pos(m) + (1 - y) * neg(m; gamma) and d ce / d m, elementwise."""
    sig, sig_neg, sp, sp_neg = _logistic(m)
    if GAMMA == 0.0:
        neg = sp
        d_neg = sig
    else:
        # -log(min(1 - s(m) + gamma, 1)): exactly zero (loss and gradient) where s(m) <= gamma.
        # tl.full keeps gamma exact in fp64 (a bare float literal would be an fp32 constant).
        gamma = tl.full([], GAMMA, m.dtype)
        q = sig_neg + gamma
        active = sig > gamma
        neg = tl.where(active, -tl.log(q), 0.0)
        d_neg = tl.where(active, sig * sig_neg / q, 0.0)
    value = y * sp_neg + (1.0 - y) * neg
    grad = (1.0 - y) * d_neg - y * sig_neg
    return value, grad


@triton.jit
def _masked_logsumexp(f, mask):
    """log sum_{k in mask} exp(f_k) per row (the mask always holds column 0)."""
    top = tl.max(tl.where(mask, f, float("-inf")), axis=1)
    return top + tl.log(tl.sum(tl.exp(tl.where(mask, f - top[:, None], float("-inf"))), axis=1))


@triton.jit
def loss_rows(f, y, cols, C: tl.constexpr, LOSS: tl.constexpr, GAMMA: tl.constexpr, MARGIN_REG: tl.constexpr):
    """Per-row loss ``[rows]`` and d(loss)/d(f) ``[rows, cols]`` of logits ``f`` with multi-hot
    labels ``y`` (both in the loss dtype). Column 0 is the none class; columns ``>= C`` are
    padding and get a zero gradient."""
    is_none = cols[None, :] == 0
    is_rel = (cols[None, :] >= 1) & (cols[None, :] < C)
    f0 = tl.sum(tl.where(is_none, f, 0.0), axis=1)
    if LOSS == NCRL:
        ce, d_ce = _margin_ce(f - f0[:, None], y, GAMMA)
        d_ce = tl.where(is_rel, d_ce, 0.0)
        loss = tl.sum(tl.where(is_rel, ce, 0.0), axis=1)
        d_f0 = -tl.sum(d_ce, axis=1)
        if MARGIN_REG:
            # ce(f0 - mean(f_1..f_K), y_0): the mean is not detached, each f_k gets 1/K of it.
            y0 = tl.sum(tl.where(is_none, y, 0.0), axis=1)
            mean_rel = tl.sum(tl.where(is_rel, f, 0.0), axis=1) / (C - 1)
            reg, d_reg = _margin_ce(f0 - mean_rel, y0, GAMMA)
            loss += reg
            d_f0 += d_reg
            d_ce -= tl.where(is_rel, d_reg[:, None] / (C - 1), 0.0)
        grad = tl.where(is_none, d_f0[:, None], d_ce)
    elif LOSS == ATL:
        # -sum_{k in P} y_k log softmax_P(f)_k - log softmax_Q(f)_0, P = {0} + positives,
        # Q = {0} + negatives (y_0 ignored; a nonzero label is a positive).
        pos = is_rel & (y != 0.0)
        in_p = is_none | pos
        in_q = is_none | (is_rel & (y == 0.0))
        lse_p = _masked_logsumexp(f, in_p)
        lse_q = _masked_logsumexp(f, in_q)
        n_pos = tl.sum(tl.where(pos, y, 0.0), axis=1)
        loss = lse_q - f0 + tl.sum(tl.where(pos, y * (lse_p[:, None] - f), 0.0), axis=1)
        # exp(f - lse) <= 1 inside each set; the clamp only keeps the columns outside it (whose
        # values are discarded below) from overflowing.
        soft_p = n_pos[:, None] * tl.exp(tl.minimum(f - lse_p[:, None], 0.0))
        soft_q = tl.exp(tl.minimum(f - lse_q[:, None], 0.0))
        grad = tl.where(pos, soft_p - y, tl.where(in_q, soft_q, 0.0))
        grad = tl.where(is_none, soft_p + soft_q - 1.0, grad)
    else:
        tl.static_assert(LOSS == BCE)
        sig, _, sp, _ = _logistic(f)
        loss = tl.sum(tl.where(is_rel, sp - y * f, 0.0), axis=1)
        grad = tl.where(is_rel, sig - y, 0.0)
    return loss, grad


# Rows per program of the epilogue: the loss keeps a dozen temporaries per element in registers.
# With 16 rows the NCRL epilogue used 255 registers and spilled 64-288 bytes per thread (the most
# with Triton 3.8 on sm_120, past compile_check's limit); with 8 it needs about 100, spill-free on
# sm_80-sm_120 with Triton 3.6, 3.8 and 3.9. It is a small kernel (0.01 ms of GPU time at N=4096).
EPILOGUE_ROWS = 8


@triton.jit(do_not_specialize=["N", "SPLIT"])
def epilogue_kernel(
    partial, SPLIT, bias, labels, logits, dlogits, row_loss, N,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_LOGITS: tl.constexpr,
    LOSS: tl.constexpr, GAMMA: tl.constexpr, MARGIN_REG: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, GRAD_COLS: tl.constexpr,
):
    """One program per BLOCK_N rows: f = sum_k partial[k] (in order k = 0, 1, ..., so the result
    does not depend on timing) + bias, in the loss dtype (fp32 or fp64); the logits in their
    dtype when WRITE_LOGITS; then, unless LOSS is HEAD_ONLY, the row losses and d(loss)/d(f) from
    f itself (as the C++ kernels do, not from the logits rounded to bf16/fp16), both divided by N
    for the mean reduction: the row losses' sum is then the mean, without a division kernel on
    the host's path (per_pair_reduction). d(loss)/d(f) goes to rows of GRAD_COLS columns in
    dlogits' dtype: C, or BLOCK_C for the head backward's zero-padded grad operand
    (head_backward.padded_grad), the padding columns' gradient being zero. The loss-only op
    passes its logits as the one partial."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_C)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    at = rows[:, None] * C + cols[None, :]
    ok = row_ok[:, None] & (cols[None, :] < C)
    f = tl.load(partial + at, mask=ok, other=0.0)
    for k in range(1, SPLIT):  # offsets in 64 bits: k*N*C may pass 2**31
        f += tl.load(partial + tl.cast(k, tl.int64) * N * C + at, mask=ok, other=0.0)
    if HAS_BIAS:
        f += tl.load(bias + cols, mask=cols < C, other=0.0).to(f.dtype)[None, :]
    if WRITE_LOGITS:
        tl.store(logits + at, f.to(logits.dtype.element_ty), mask=ok)
    if LOSS != HEAD_ONLY:
        y = tl.load(labels + at, mask=ok, other=0.0).to(f.dtype)
        loss, grad = loss_rows(f, y, cols, C, LOSS, GAMMA, MARGIN_REG)
        if MEAN:
            pairs = tl.maximum(N, 1).to(f.dtype)
            loss, grad = loss / pairs, grad / pairs
        tl.store(row_loss + rows, loss, mask=row_ok)
        grad_at = rows[:, None] * GRAD_COLS + cols[None, :]
        grad_ok = row_ok[:, None] & (cols[None, :] < GRAD_COLS)
        tl.store(dlogits + grad_at, grad.to(dlogits.dtype.element_ty), mask=grad_ok)


def launch_epilogue(partial, bias, logits, *, labels=None, dlogits=None, row_loss=None, loss=0, gamma=0.0,
                    margin_reg=False, mean=False):
    """From partial ``[SPLIT, N, C]`` (loss dtype): logits [N, C] (None: not written) and, when
    `loss` is a loss code (not 0, head only), row_loss [N] in the loss dtype and dlogits, [N, C]
    or the zero-padded [N, BLOCK_C] (any float dtype), divided by N where `mean`. All tensors
    contiguous; `labels` in the loss dtype."""
    split, n, classes = partial.shape
    if n == 0:
        return
    launcher(epilogue_kernel)[(cdiv(n, EPILOGUE_ROWS),)](
        partial, split, bias, labels, logits, dlogits, row_loss, n,
        C=classes, HAS_BIAS=bias is not None, WRITE_LOGITS=logits is not None,
        LOSS=loss, GAMMA=gamma, MARGIN_REG=margin_reg, MEAN=mean, BLOCK_C=padded(classes), BLOCK_N=EPILOGUE_ROWS,
        GRAD_COLS=classes if dlogits is None else dlogits.shape[1], num_warps=4, **COMPILE_OPTIONS,
    )


def per_pair_reduction(reduction):
    """The reduction that turns the epilogue's row losses into the loss for `reduction`: its row
    losses are already divided by N for "mean", so their sum is it."""
    return "sum" if reduction == "mean" else reduction
