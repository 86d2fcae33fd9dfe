"""Backward of the group-bilinear head from grad = d(loss)/d(logits) ``[N, C]``, recomputing the
Kronecker feature tile by tile (never the [N, E*B] feature or its gradient). Two kernels, both
deterministic (every output element is written by one program, in a fixed order, no atomics):

- ``weight_grad_kernel``: one program per feature row s = g*B + i, i.e. the weight columns
  s*B .. s*B + B - 1 of every class, looping over all pair tiles:
  dW[:, s*B + j] = sum_n grad[n, :] * feature[n, s*B + j]; program 0 also sums grad into d bias.
- ``input_grad_kernel``: one program per (pair tile, group g): the feature gradient grad @ W_g
  one feature row at a time on tensor cores, reduced against ts and hs into that group's columns
  of d hs and d ts.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import autotune, config, mma, padded, pair_bucket
from .head_forward import column, feature_slice, group_columns

# Pair-tile size of the weight gradient. It fixes the order in which pair tiles are summed, so it
# is not autotuned: d weight is then bitwise the same whichever config the autotuner picks. (64:
# no spills at DocRED shapes on sm_90 for bf16, TF32 and fp64; 128 spills.)
WEIGHT_GRAD_BLOCK_N = 64

WEIGHT_GRAD_CONFIGS = [config(8, 3), config(8, 2), config(4, 3)]


@autotune(WEIGHT_GRAD_CONFIGS, config(1, 1))
@triton.jit(do_not_specialize=["N"])
def weight_grad_kernel(
    grad, hs, ts, dweight, dbias, N, N_BUCKET,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, ALLOW_TF32: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    s = tl.program_id(0)
    g = s // B
    js = tl.arange(0, BLOCK_J)
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([BLOCK_C, BLOCK_J], dtype=COMPUTE)
    dbias_acc = tl.zeros([BLOCK_C], dtype=COMPUTE)
    for first in range(0, N, BLOCK_N):
        rows = first + tl.arange(0, BLOCK_N)
        row_ok = rows < N
        rows = rows.to(tl.int64)
        grad_t = tl.load(grad + rows[None, :] * C + cs[:, None], mask=(cs[:, None] < C) & row_ok[None, :],
                         other=0.0).to(COMPUTE)  # [BLOCK_C, BLOCK_N]
        t_group = group_columns(ts, rows, row_ok, g, js, E, B)
        h_group = t_group
        if SYMMETRIC:
            h_group = group_columns(hs, rows, row_ok, g, js, E, B)
        x = feature_slice(hs, ts, rows, row_ok, s, h_group, t_group, E, SYMMETRIC, COMPUTE)
        operand = dweight.dtype.element_ty
        acc = mma(grad_t.to(operand), x.to(operand), acc, ALLOW_TF32)
        # Every program sums grad (cheap next to the mma); only program 0 stores it.
        dbias_acc += tl.sum(grad_t, axis=1)
    at = cs.to(tl.int64)[:, None] * (E * B) + s * B + js[None, :]
    tl.store(dweight + at, acc.to(dweight.dtype.element_ty), mask=(cs[:, None] < C) & (js[None, :] < B))
    tl.store(dbias + cs, dbias_acc, mask=cs < tl.where(s == 0, C, 0))  # program 0 only


INPUT_GRAD_CONFIGS = [
    config(8, 3, BLOCK_N=64),
    config(8, 3, BLOCK_N=128),
    config(4, 3, BLOCK_N=64),
    config(4, 4, BLOCK_N=32),
]


@autotune(INPUT_GRAD_CONFIGS, config(1, 1, BLOCK_N=128))
@triton.jit(do_not_specialize=["N"])
def input_grad_kernel(
    grad, hs, ts, weight, dhs, dts, N, N_BUCKET,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, ALLOW_TF32: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    js = tl.arange(0, BLOCK_J)
    cs = tl.arange(0, BLOCK_C)
    grad_tile = tl.load(grad + rows[:, None] * C + cs[None, :], mask=row_ok[:, None] & (cs[None, :] < C),
                        other=0.0).to(weight.dtype.element_ty)
    # Weight slice of feature row s as a [BLOCK_C, BLOCK_J] operand: weight[c, s*B + j].
    w_at = cs.to(tl.int64)[:, None] * (E * B) + js[None, :]
    w_ok = (cs[:, None] < C) & (js[None, :] < B)
    t_group = group_columns(ts, rows, row_ok, g, js, E, B)
    h_group = group_columns(hs, rows, row_ok, g, js, E, B)
    dh = tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE)
    dt = tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE)
    for i in range(B):
        s = g * B + i
        w = tl.load(weight + w_at + s * B, mask=w_ok, other=0.0)
        # d[n, j] = d loss / d feature[n, s*B + j], the feature being hs_i * ts_j (plain) or
        # max(hs_i ts_j, hs_j ts_i) (symmetric).
        d = mma(grad_tile, w, tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE), ALLOW_TF32)
        h_i = column(hs, rows, row_ok, s, E, COMPUTE)
        column_i = js[None, :] == i
        to_hi_tj = d
        if SYMMETRIC:
            # Route d to the larger product, half to each on an exact tie (torch.maximum's rule;
            # the diagonal j == i is such a tie and so keeps its full gradient):
            # to_hi_tj flows to hs_i * ts_j, the rest to hs_j * ts_i.
            t_i = column(ts, rows, row_ok, s, E, COMPUTE)
            a_ij = h_i[:, None] * t_group.to(COMPUTE)
            a_ji = h_group.to(COMPUTE) * t_i[:, None]
            to_hi_tj = tl.where(a_ij > a_ji, d, tl.where(a_ij < a_ji, 0.0, 0.5 * d))
            to_hj_ti = d - to_hi_tj
            dh += to_hj_ti * t_i[:, None]
            dt += tl.where(column_i, tl.sum(to_hj_ti * h_group.to(COMPUTE), axis=1)[:, None], 0.0)
        dh += tl.where(column_i, tl.sum(to_hi_tj * t_group.to(COMPUTE), axis=1)[:, None], 0.0)
        dt += to_hi_tj * h_i[:, None]
    at = rows[:, None] * E + g * B + js[None, :]
    ok = row_ok[:, None] & (js[None, :] < B)
    tl.store(dhs + at, dh.to(dhs.dtype.element_ty), mask=ok)
    tl.store(dts + at, dt.to(dts.dtype.element_ty), mask=ok)


def launch_head_backward(grad, hs, ts, weight, *, block_size, symmetric, allow_tf32, dhs=None, dts=None,
                         dweight=None, dbias=None):
    """Fill dhs, dts (both or neither) and dweight, dbias (both or neither) from grad [N, C].
    All tensors contiguous; dbias is in the compute dtype (fp32, fp64 for fp64 inputs)."""
    n, emb = hs.shape
    classes = weight.shape[0]
    shapes = dict(
        E=emb, B=block_size, C=classes, SYMMETRIC=symmetric, ALLOW_TF32=allow_tf32,
        COMPUTE_FP64=hs.dtype == torch.float64, BLOCK_J=padded(block_size), BLOCK_C=padded(classes),
    )
    if dweight is not None:
        wrap_triton(weight_grad_kernel)[(emb,)](
            grad, hs, ts, dweight, dbias, n, pair_bucket(n), BLOCK_N=WEIGHT_GRAD_BLOCK_N, **shapes
        )
    if dhs is not None and n > 0:
        wrap_triton(input_grad_kernel)[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), emb // block_size)](
            grad, hs, ts, weight, dhs, dts, n, pair_bucket(n), **shapes
        )
