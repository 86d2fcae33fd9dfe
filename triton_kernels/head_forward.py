"""Forward of the group-bilinear head, with the loss as an optional epilogue: one launch computes
logits = bias + sum_g kron(hs_g, ts_g) @ W_g^T and, for the fused op, the row losses and
d(loss)/d(logits), without ever writing the [N, E*B] feature.

Work split: one program per tile of BLOCK_N pairs x all C classes (padded to a power of two), so
that a program holds complete logit rows and can run the loss on them. It walks the E*B feature
columns in steps of one feature row (group g, row i: the B columns s*B .. s*B + B - 1 with
s = g*B + i), building that [BLOCK_N, B] slice of the Kronecker feature in registers from one
column of hs and the group's columns of ts, and multiplies it with the matching [B, C] weight
slice on tensor cores, accumulating in fp32 (fp64 for fp64 inputs).
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import HEAD_ONLY, autotune, config, mma, padded, pair_bucket
from .loss_rows import loss_tile


@triton.jit
def group_columns(x, rows, row_ok, g, js, E: tl.constexpr, B: tl.constexpr):
    """The B columns of group g of x ([N, E]) for a pair tile, in x's dtype (half the registers of
    fp32 for bf16/fp16); padding 0."""
    return tl.load(x + rows[:, None] * E + g * B + js[None, :], mask=row_ok[:, None] & (js[None, :] < B), other=0.0)


@triton.jit
def column(x, rows, row_ok, s, E: tl.constexpr, COMPUTE: tl.constexpr):
    """Column s of x ([N, E]) for a pair tile, in the compute dtype."""
    return tl.load(x + rows * E + s, mask=row_ok, other=0.0).to(COMPUTE)


@triton.jit
def feature_slice(hs, ts, rows, row_ok, s, h_group, t_group, E: tl.constexpr, SYMMETRIC: tl.constexpr,
                  COMPUTE: tl.constexpr):
    """Feature row s = g*B + i of a pair tile, ``[BLOCK_N, BLOCK_J]`` in the compute dtype:
    hs[n, s] * ts[n, g*B + j] (symmetric: max(hs_i ts_j, hs_j ts_i)). The products of bf16/fp16
    values are exact in fp32, so the max (and, in the backward, its tie test) matches fp64."""
    x = column(hs, rows, row_ok, s, E, COMPUTE)[:, None] * t_group.to(COMPUTE)
    if SYMMETRIC:
        x = tl.maximum(x, h_group.to(COMPUTE) * column(ts, rows, row_ok, s, E, COMPUTE)[:, None])
    return x


# Spill-free on sm_90 for fp32 and bf16 at DocRED shapes (compile_check) except BLOCK_N=128, kept
# for large N where it halves the weight reads; BLOCK_N=32 gives small N more programs.
FORWARD_CONFIGS = [
    config(8, 3, BLOCK_N=64, EPILOGUE_ROWS=16),
    config(8, 3, BLOCK_N=128, EPILOGUE_ROWS=16),
    config(4, 3, BLOCK_N=64, EPILOGUE_ROWS=8),
    config(4, 4, BLOCK_N=32, EPILOGUE_ROWS=8),
]


@autotune(FORWARD_CONFIGS, config(1, 1, BLOCK_N=128, EPILOGUE_ROWS=128),
          key=("N_BUCKET", "E", "B", "C", "SYMMETRIC", "ALLOW_TF32", "LOSS"))
@triton.jit(do_not_specialize=["N"])
def head_forward_kernel(
    hs, ts, weight, bias, labels, logits, dlogits, row_loss, N, N_BUCKET,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    HAS_BIAS: tl.constexpr, SYMMETRIC: tl.constexpr, ALLOW_TF32: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    LOSS: tl.constexpr, GAMMA: tl.constexpr, MARGIN_REG: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, EPILOGUE_ROWS: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)  # row offsets n*E stay exact for any N
    js = tl.arange(0, BLOCK_J)
    cs = tl.arange(0, BLOCK_C)
    # Weight slice of feature row s as a [BLOCK_J, BLOCK_C] operand: weight[c, s*B + j].
    w_at = cs.to(tl.int64)[None, :] * (E * B) + js[:, None]
    w_ok = (js[:, None] < B) & (cs[None, :] < C)

    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE)
    for g in range(E // B):
        t_group = group_columns(ts, rows, row_ok, g, js, E, B)
        h_group = t_group
        if SYMMETRIC:
            h_group = group_columns(hs, rows, row_ok, g, js, E, B)
        for i in range(B):
            s = g * B + i
            x = feature_slice(hs, ts, rows, row_ok, s, h_group, t_group, E, SYMMETRIC, COMPUTE)
            w = tl.load(weight + w_at + s * B, mask=w_ok, other=0.0)
            acc = mma(x.to(w.dtype), w, acc, ALLOW_TF32)
    if HAS_BIAS:
        acc += tl.load(bias + cs, mask=cs < C, other=0.0).to(COMPUTE)[None, :]

    out_at = rows[:, None] * C + cs[None, :]
    out_ok = row_ok[:, None] & (cs[None, :] < C)
    tl.store(logits + out_at, acc.to(logits.dtype.element_ty), mask=out_ok)
    if LOSS != HEAD_ONLY:
        # The loss reads the fp32 accumulator, not the logits rounded to the input dtype (as the
        # C++ kernels do; ATLOP's eager code casts bf16 logits back up with .float()). It runs on
        # EPILOGUE_ROWS rows at a time: the whole tile with the loss's temporaries would not fit
        # in registers. The accumulator goes through this program's rows of dlogits (still in
        # cache) to get there; the barrier makes those stores visible to all of the program's
        # threads before they read them back.
        tl.store(dlogits + out_at, acc, mask=out_ok)
        tl.debug_barrier()
        for first in range(tl.program_id(0) * BLOCK_N, tl.program_id(0) * BLOCK_N + BLOCK_N, EPILOGUE_ROWS):
            loss_tile(dlogits, labels, dlogits, row_loss, first, N, C, LOSS, GAMMA, MARGIN_REG, MEAN,
                      EPILOGUE_ROWS, BLOCK_C)


def launch_head_forward(hs, ts, weight, bias, logits, *, block_size, symmetric, allow_tf32, labels=None,
                        dlogits=None, row_loss=None, loss=0, gamma=0.0, margin_reg=False, mean=False):
    """Write logits [N, C] (hs dtype) and, when `loss` is a loss code (not 0, head only), row_loss
    [N] and dlogits [N, C] in the loss dtype. All tensors contiguous; `labels` in the loss dtype."""
    n, emb = hs.shape
    classes = weight.shape[0]
    if n == 0:
        return
    wrap_triton(head_forward_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](
        hs, ts, weight, bias, labels, logits, dlogits, row_loss, n, pair_bucket(n),
        E=emb, B=block_size, C=classes,
        HAS_BIAS=bias is not None, SYMMETRIC=symmetric, ALLOW_TF32=allow_tf32,
        COMPUTE_FP64=hs.dtype == torch.float64,
        LOSS=loss, GAMMA=gamma, MARGIN_REG=margin_reg, MEAN=mean,
        BLOCK_J=padded(block_size), BLOCK_C=padded(classes),
    )
