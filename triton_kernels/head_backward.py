"""Backward of the group-bilinear head from grad = d(loss)/d(logits), recomputing the Kronecker
feature tile by tile (never the [N, E*B] feature or its gradient). Both kernels are
deterministic (every output element is written by one program, in a fixed order, no atomics).

The caller passes grad as a zero-padded ``[N, BLOCK_C]`` tensor in the operands' dtype (bf16
under bf16 autocast, as the eager head's backward gets it): its rows are then 16-byte aligned and
every load is unmasked along the classes.

- ``weight_grad_kernel``: one program per ROWS feature rows s0 .. s0 + ROWS - 1 of a group (the
  weight columns s*B + j of every class), looping over all pair tiles in order:
  ``dW[:, s*B + j]^T += feature[tile, s*B + j]^T @ grad[tile]``, the feature rows stacked into the
  M dimension of one tl.dot (M = ROWS*B) so that each grad tile read serves ROWS rows.
- ``input_grad_kernel``: one program per (pair tile, group g): ``d feature = grad @ W`` for ROWS
  feature rows per tl.dot (N = ROWS*B), reduced against ts and hs into that group's columns of
  d hs and d ts.
d bias is grad's column sum, done by the caller.
"""
import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from ._common import Tiles, cdiv, mma, padded, pick_tiles
from .head_forward import rows_of, weight_rows_at


@triton.jit
def kron_rows_t(hs, ts, ns, n_ok, s0, g, E: tl.constexpr, B: tl.constexpr, SYMMETRIC: tl.constexpr,
                COMPUTE: tl.constexpr, BLOCK_J: tl.constexpr, ROWS: tl.constexpr):
    """The transpose of head_forward.kron_rows: ``[ROWS, BLOCK_J, BLOCK_N]``, feature rows
    s0 + r, columns j, pairs ns."""
    rs = tl.arange(0, ROWS)
    js = tl.arange(0, BLOCK_J)
    group_ok = (js[:, None] < B) & n_ok[None, :]
    at_group = ns[None, :] * E + g * B + js[:, None]
    at_rows = ns[None, :] * E + s0 + rs[:, None]
    t_group = tl.load(ts + at_group, mask=group_ok, other=0.0).to(COMPUTE)
    h_rows = tl.load(hs + at_rows, mask=n_ok[None, :], other=0.0).to(COMPUTE)
    x = h_rows[:, None, :] * t_group[None, :, :]
    if SYMMETRIC:
        h_group = tl.load(hs + at_group, mask=group_ok, other=0.0).to(COMPUTE)
        t_rows = tl.load(ts + at_rows, mask=n_ok[None, :], other=0.0).to(COMPUTE)
        x = tl.maximum(x, t_rows[:, None, :] * h_group[None, :, :])
    return x


@triton.jit(do_not_specialize=["N"])
def weight_grad_kernel(
    grad, hs, ts, dweight, N,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    s0 = tl.program_id(0) * ROWS
    g = s0 // B
    cs = tl.arange(0, BLOCK_C)
    acc = tl.zeros([ROWS * BLOCK_J, BLOCK_C], dtype=COMPUTE)
    for first in range(0, N, BLOCK_N):
        ns = first + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        ns = ns.to(tl.int64)
        x = kron_rows_t(hs, ts, ns, n_ok, s0, g, E, B, SYMMETRIC, COMPUTE, BLOCK_J, ROWS)
        grad_tile = tl.load(grad + ns[:, None] * BLOCK_C + cs[None, :], mask=n_ok[:, None], other=0.0)
        acc = mma(tl.reshape(x, [ROWS * BLOCK_J, BLOCK_N]).to(grad_tile.dtype), grad_tile, acc, PRECISION)
    k_at, k_ok = weight_rows_at(E, B, BLOCK_J, ROWS)
    at = cs.to(tl.int64)[None, :] * (E * B) + s0 * B + k_at[:, None]
    tl.store(dweight + at, acc.to(dweight.dtype.element_ty), mask=k_ok[:, None] & (cs[None, :] < C))


@triton.jit
def scatter_columns(values, first, BLOCK_J: tl.constexpr):
    """``[BLOCK_N, ROWS]`` values of columns first .. first + ROWS - 1 as a ``[BLOCK_N, BLOCK_J]``
    tile, zero elsewhere."""
    rs = tl.arange(0, values.shape[1])
    js = tl.arange(0, BLOCK_J)
    hit = (first + rs)[None, :, None] == js[None, None, :]
    return tl.sum(tl.where(hit, values[:, :, None], 0.0), axis=1)


@triton.jit(do_not_specialize=["N"])
def input_grad_kernel(
    grad, hs, ts, weight, dhs, dts, N,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    js = tl.arange(0, BLOCK_J)
    cs = tl.arange(0, BLOCK_C)
    grad_tile = tl.load(grad + rows[:, None] * BLOCK_C + cs[None, :], mask=row_ok[:, None], other=0.0)
    k_at, k_ok = weight_rows_at(E, B, BLOCK_J, ROWS)
    # Weight slice of a step as a [BLOCK_C, ROWS*BLOCK_J] operand: weight[c, s0*B + k_at].
    w_at = cs.to(tl.int64)[:, None] * (E * B) + k_at[None, :]
    w_ok = (cs[:, None] < C) & k_ok[None, :]
    group_ok = row_ok[:, None] & (js[None, :] < B)
    at_group = rows[:, None] * E + g * B + js[None, :]
    # Held in the input dtype (half the registers of fp32 for bf16/fp16), widened where used.
    t_group = tl.load(ts + at_group, mask=group_ok, other=0.0)
    h_group = tl.load(hs + at_group, mask=group_ok, other=0.0)
    dh = tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE)
    dt = tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE)
    # As in the forward, hs's (and ts's) ROWS columns of a step are loaded one step ahead.
    h_next = rows_of(hs, rows, row_ok, g * B, E, ROWS)
    t_next = h_next
    if SYMMETRIC:
        t_next = rows_of(ts, rows, row_ok, g * B, E, ROWS)
    for i0 in range(0, B, ROWS):
        s0 = g * B + i0
        h_rows, t_rows = h_next.to(COMPUTE), t_next.to(COMPUTE)
        ahead = g * B + (i0 + ROWS) % B  # the last step loads the group's first rows again, unused
        h_next = rows_of(hs, rows, row_ok, ahead, E, ROWS)
        if SYMMETRIC:
            t_next = rows_of(ts, rows, row_ok, ahead, E, ROWS)
        w = tl.load(weight + w_at + s0 * B, mask=w_ok, other=0.0)
        # d[n, r, j] = d loss / d feature[n, (s0 + r)*B + j], the feature being hs_i * ts_j
        # (plain) or max(hs_i ts_j, hs_j ts_i) (symmetric), i = i0 + r.
        d = mma(grad_tile, w, tl.zeros([BLOCK_N, ROWS * BLOCK_J], dtype=COMPUTE), PRECISION)
        d = tl.reshape(d, [BLOCK_N, ROWS, BLOCK_J])
        to_hi_tj = d
        if SYMMETRIC:
            # Route d to the larger product, half to each on an exact tie (torch.maximum's rule;
            # the diagonal j == i is such a tie and so keeps its full gradient):
            # to_hi_tj flows to hs_i * ts_j, the rest to hs_j * ts_i.
            a_ij = h_rows[:, :, None] * t_group.to(COMPUTE)[:, None, :]
            a_ji = t_rows[:, :, None] * h_group.to(COMPUTE)[:, None, :]
            to_hi_tj = tl.where(a_ij > a_ji, d, tl.where(a_ij < a_ji, 0.0, 0.5 * d))
            to_hj_ti = d - to_hi_tj
            dh += tl.sum(to_hj_ti * t_rows[:, :, None], axis=1)
            dt += scatter_columns(tl.sum(to_hj_ti * h_group.to(COMPUTE)[:, None, :], axis=2), i0, BLOCK_J)
        dh += scatter_columns(tl.sum(to_hi_tj * t_group.to(COMPUTE)[:, None, :], axis=2), i0, BLOCK_J)
        dt += tl.sum(to_hi_tj * h_rows[:, :, None], axis=1)
    tl.store(dhs + at_group, dh.to(dhs.dtype.element_ty), mask=group_ok)
    tl.store(dts + at_group, dt.to(dts.dtype.element_ty), mask=group_ok)


# Candidate configs per operand kind, the default first (see head_forward.FORWARD_TILES), as
# timed on the H200 at N=4096 (bench/results/nvidia-h200-kernels.csv): in 16-bit, 4 rows per
# program made d weight 10-25% faster than 2; 128-pair tiles made d input 20% (bf16) to 75%
# (TF32) faster than 64; two rows per dot in d input ran 5x slower, so it has one. d weight sums
# over pair tiles in order, so a config's block_n fixes its summation order.
WEIGHT_GRAD_TILES = {
    "16bit": [Tiles(64, 4, 8, 2), Tiles(64, 2, 8, 3), Tiles(128, 2, 8, 2)],
    "tf32": [Tiles(64, 2, 8, 3), Tiles(128, 2, 8, 2)],
    "tf32x3": [Tiles(64, 2, 8, 2)],
    "fp64": [Tiles(32, 1, 4, 2)],
}
INPUT_GRAD_TILES = {
    "16bit": [Tiles(128, 1, 8, 3), Tiles(64, 1, 8, 3)],
    "tf32": [Tiles(128, 1, 8, 3), Tiles(64, 1, 8, 3)],
    "tf32x3": [Tiles(64, 1, 8, 2)],
    "fp64": [Tiles(32, 1, 4, 2)],
}


def launch_head_backward(grad, hs, ts, weight, *, block_size, symmetric, precision, dhs=None, dts=None,
                         dweight=None, weight_tiles=None, input_tiles=None):
    """Fill dhs, dts (both or neither) and dweight from grad ``[N, padded(C)]`` (zero-padded, in
    the operands' dtype). All tensors contiguous. `*_tiles` override the default configs."""
    n, emb = hs.shape
    classes = weight.shape[0]
    shapes = dict(
        E=emb, B=block_size, C=classes, SYMMETRIC=symmetric, PRECISION=precision,
        COMPUTE_FP64=hs.dtype == torch.float64, BLOCK_J=padded(block_size), BLOCK_C=padded(classes),
    )
    if dweight is not None:
        launch = (weight_tiles or pick_tiles(WEIGHT_GRAD_TILES, hs.dtype, precision)).launch_args(block_size)
        wrap_triton(weight_grad_kernel)[(emb // launch["ROWS"],)](grad, hs, ts, dweight, n, **shapes, **launch)
    if dhs is not None and n > 0:
        tiles = input_tiles or pick_tiles(INPUT_GRAD_TILES, hs.dtype, precision)
        wrap_triton(input_grad_kernel)[(cdiv(n, tiles.block_n), emb // block_size)](
            grad, hs, ts, weight, dhs, dts, n, **shapes, **tiles.launch_args(block_size)
        )
