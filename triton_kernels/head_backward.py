"""Backward of the group-bilinear head from grad = d(loss)/d(logits), recomputing the Kronecker
feature tile by tile (never the [N, E*B] feature or its gradient). Both kernels are
deterministic (every output element is written by one program, in a fixed order, no atomics).

The caller passes grad zero-padded to the class tile in the operands' dtype (bf16 under bf16
autocast, as the eager head's backward gets it), so its rows are 16-byte aligned and every load is
unmasked along the classes; ``padded_grad`` prepares it, or the fused forward's epilogue writes it
so. Both kernels optionally multiply what they write by a scalar ``scale`` read from memory (the
incoming gradient of a fused op's mean or sum loss: the backward then needs no kernel to scale
grad first). For fp32 operands (TF32, 3xTF32)
the operands the dots read from memory come K-major: grad transposed (``[BLOCK_C, N']``, pairs
contiguous) for the d weight dot, and a transposed, class-padded weight (``[E*B, BLOCK_C]``) for the
d input dot (whose grad operand is K-major as it is). Hopper's wgmma reads 32-bit shared-memory
operands only K-major; given the natural (MN-major) layouts, Triton transposes them on the way in
with 4-byte copies instead of 16-byte ones (compile_check reports the copy sizes). 16-bit wgmma
transposes for free, so 16-bit operands keep the natural layouts. The d weight kernel's feature
tile, built in registers, needs the pairs innermost too, so in fp32 it also reads hs and ts
transposed (``[E, N']``): from ``[N, E]`` their group tile came by 4-byte copies.

- ``weight_grad_kernel``: one program per ROWS feature rows s0 .. s0 + ROWS - 1 of a group (the
  weight columns s*B + j of every class), looping over all pair tiles in order:
  ``dW[:, s*B + j]^T += feature[tile, s*B + j]^T @ grad[tile]``, the feature rows stacked into the
  M dimension of one tl.dot (M = ROWS*BLOCK_J, BLOCK_J being B padded to a power of two >= 16) so
  that each grad tile read serves ROWS rows; and one program more for d bias, the column sums of
  grad as it was before its rounding to the operands' dtype (``bias_grad``, ``[N, BLOCK_C]``), in
  the same order, so deterministic: one host call and one kernel fewer than a torch.sum on the
  host's path, which is the 16-bit step's bound.
- ``input_grad_kernel``: one program per (pair tile, group g): ``d feature = grad @ W`` for ROWS
  feature rows per tl.dot (N = ROWS*BLOCK_J), reduced against ts and hs into that group's columns of
  d hs and d ts.
"""
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..reference import as_dtype, loss_dtype
from ._common import TRITON_VERSION, Tiles, cdiv, mma, padded, pick_tiles
from ._launch import launcher
from .head_forward import head_constants, rounded, rows_of, weight_rows_at


@triton.jit
def kron_rows_t(hs, ts, ns, n_ok, s0, g, pair_stride, E: tl.constexpr, B: tl.constexpr, SYMMETRIC: tl.constexpr,
                COMPUTE: tl.constexpr, OPERAND: tl.constexpr, BLOCK_J: tl.constexpr, ROWS: tl.constexpr,
                K_MAJOR: tl.constexpr):
    """The transpose of head_forward.kron_rows: ``[ROWS, BLOCK_J, BLOCK_N]`` in the dot's operand
    dtype, feature rows s0 + r, columns j, pairs ns; hs and ts rounded to the operand dtype, and
    products rounded to it before the symmetric max, as there. hs and ts are ``[N, E]``, or (K_MAJOR) their transposed copies
    ``[E, pair_stride]``, pairs contiguous and zero-padded, read without a mask along the pairs."""
    rs = tl.arange(0, ROWS)
    js = tl.arange(0, BLOCK_J)
    if K_MAJOR:  # masks constant along the pairs, which would otherwise split the copies
        group_ok = js[:, None] < B
        rows_ok = rs[:, None] < ROWS
        at_group = (g * B + js[:, None]).to(tl.int64) * pair_stride + ns[None, :]
        at_rows = (s0 + rs[:, None]).to(tl.int64) * pair_stride + ns[None, :]
    else:
        group_ok = (js[:, None] < B) & n_ok[None, :]
        rows_ok = n_ok[None, :]
        at_group = ns[None, :] * E + g * B + js[:, None]
        at_rows = ns[None, :] * E + s0 + rs[:, None]
    t_group = rounded(tl.load(ts + at_group, mask=group_ok, other=0.0), OPERAND, COMPUTE)
    h_rows = rounded(tl.load(hs + at_rows, mask=rows_ok, other=0.0), OPERAND, COMPUTE)
    x = (h_rows[:, None, :] * t_group[None, :, :]).to(OPERAND)
    if SYMMETRIC:
        h_group = rounded(tl.load(hs + at_group, mask=group_ok, other=0.0), OPERAND, COMPUTE)
        t_rows = rounded(tl.load(ts + at_rows, mask=rows_ok, other=0.0), OPERAND, COMPUTE)
        x = tl.maximum(x, (t_rows[:, None, :] * h_group[None, :, :]).to(OPERAND)).to(OPERAND)
    return x


@triton.jit(do_not_specialize=["N"])
def weight_grad_kernel(
    grad, hs, ts, dweight, bias_grad, dbias, scale, N, grad_stride,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    K_MAJOR: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    cs = tl.arange(0, BLOCK_C)
    if tl.program_id(0) == E // ROWS:
        # The last program: d bias, the column sums of bias_grad ([N, BLOCK_C], any float dtype),
        # over the pair tiles in order.
        total = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE)
        for first in range(0, N, BLOCK_N):
            ns = first + tl.arange(0, BLOCK_N)
            at = ns.to(tl.int64)[:, None] * BLOCK_C + cs[None, :]
            total += tl.load(bias_grad + at, mask=(ns < N)[:, None], other=0.0).to(COMPUTE)
        column_sums = tl.sum(total, axis=0)
        if HAS_SCALE:
            column_sums *= tl.load(scale).to(COMPUTE)
        tl.store(dbias + cs, column_sums.to(dbias.dtype.element_ty), mask=cs < C)
    else:
        s0 = tl.program_id(0) * ROWS
        g = s0 // B
        acc = tl.zeros([ROWS * BLOCK_J, BLOCK_C], dtype=COMPUTE)
        for first in range(0, N, BLOCK_N):
            ns = first + tl.arange(0, BLOCK_N)
            n_ok = ns < N
            ns = ns.to(tl.int64)
            x = kron_rows_t(hs, ts, ns, n_ok, s0, g, grad_stride, E, B, SYMMETRIC, COMPUTE, grad.dtype.element_ty,
                            BLOCK_J, ROWS, K_MAJOR)
            if K_MAJOR:
                # grad is [BLOCK_C, grad_stride], pairs (the dot's K) contiguous and zero-padded to
                # a multiple of every BLOCK_N: unmasked, as a mask varying along the pairs would
                # split the copies into single elements.
                grad_tile = tl.load(grad + cs.to(tl.int64)[None, :] * grad_stride + ns[:, None])
            else:  # grad is [N, BLOCK_C]
                grad_tile = tl.load(grad + ns[:, None] * BLOCK_C + cs[None, :], mask=n_ok[:, None], other=0.0)
            acc = mma(tl.reshape(x, [ROWS * BLOCK_J, BLOCK_N]), grad_tile, acc, PRECISION)
        if HAS_SCALE:
            acc *= tl.load(scale).to(COMPUTE)
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
    grad, hs, ts, weight, dhs, dts, scale, N,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
    K_MAJOR: tl.constexpr, HAS_SCALE: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    OPERAND: tl.constexpr = weight.dtype.element_ty
    g = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)
    js = tl.arange(0, BLOCK_J)
    cs = tl.arange(0, BLOCK_C)
    grad_tile = tl.load(grad + rows[:, None] * BLOCK_C + cs[None, :], mask=row_ok[:, None], other=0.0)
    k_at, k_ok = weight_rows_at(E, B, BLOCK_J, ROWS)
    # Weight slice of a step as a [BLOCK_C, ROWS*BLOCK_J] operand: weight[c, s0*B + k_at], read from
    # the weight [C, E*B] or (K_MAJOR) its transposed copy [E*B, BLOCK_C], classes (the dot's K) contiguous.
    if K_MAJOR:  # the copy is zero-padded to BLOCK_C classes: no class mask, which would split its copies
        w_at = k_at.to(tl.int64)[None, :] * BLOCK_C + cs[:, None]
        w_row = BLOCK_C  # distance between consecutive feature columns
        w_ok = k_ok[None, :] & (cs[:, None] < BLOCK_C)
    else:
        w_at = cs.to(tl.int64)[:, None] * (E * B) + k_at[None, :]
        w_row = 1
        w_ok = (cs[:, None] < C) & k_ok[None, :]
    group_ok = row_ok[:, None] & (js[None, :] < B)
    at_group = rows[:, None] * E + g * B + js[None, :]
    # Held rounded to the operand dtype (half the registers of fp32 for bf16/fp16; hs and ts may
    # be wider, see head_forward.rounded), widened where used.
    t_group = tl.load(ts + at_group, mask=group_ok, other=0.0).to(OPERAND)
    h_group = tl.load(hs + at_group, mask=group_ok, other=0.0).to(OPERAND)
    dh = tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE)
    dt = tl.zeros([BLOCK_N, BLOCK_J], dtype=COMPUTE)
    # As in the forward, hs's (and ts's) ROWS columns of a step are loaded one step ahead.
    h_next = rows_of(hs, rows, row_ok, g * B, E, ROWS)
    t_next = h_next
    if SYMMETRIC:
        t_next = rows_of(ts, rows, row_ok, g * B, E, ROWS)
    for i0 in range(0, B, ROWS):
        s0 = g * B + i0
        h_rows, t_rows = rounded(h_next, OPERAND, COMPUTE), rounded(t_next, OPERAND, COMPUTE)
        ahead = g * B + (i0 + ROWS) % B  # the last step loads the group's first rows again, unused
        h_next = rows_of(hs, rows, row_ok, ahead, E, ROWS)
        if SYMMETRIC:
            t_next = rows_of(ts, rows, row_ok, ahead, E, ROWS)
        w = tl.load(weight + w_at + s0 * B * w_row, mask=w_ok, other=0.0)
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
            # The share (1, 0 or 1/2) as arithmetic on 0/1 values rather than nested tl.where:
            # a tile's worth of predicates ran out and was parked bit by bit in registers (sm_90
            # SASS per step and thread, Triton 3.6: bf16 815 -> 678 instructions, TF32 913 -> 704).
            # Exact for finite d (d * 1, d * 0, d * 0.5); an infinite d now gives NaN on both routes.
            share = 0.5 + 0.5 * ((a_ij > a_ji).to(COMPUTE) - (a_ij < a_ji).to(COMPUTE))
            to_hi_tj = d * share
            to_hj_ti = d - to_hi_tj
            dh += tl.sum(to_hj_ti * t_rows[:, :, None], axis=1)
            dt += scatter_columns(tl.sum(to_hj_ti * h_group.to(COMPUTE)[:, None, :], axis=2), i0, BLOCK_J)
        dh += scatter_columns(tl.sum(to_hi_tj * t_group.to(COMPUTE)[:, None, :], axis=2), i0, BLOCK_J)
        dt += tl.sum(to_hi_tj * h_rows[:, :, None], axis=1)
    if HAS_SCALE:
        dh *= tl.load(scale).to(COMPUTE)
        dt *= tl.load(scale).to(COMPUTE)
    tl.store(dhs + at_group, dh.to(dhs.dtype.element_ty), mask=group_ok)
    tl.store(dts + at_group, dt.to(dts.dtype.element_ty), mask=group_ok)


# Candidate configs per operand kind, the default first (see head_forward.FORWARD_TILES), as
# timed on the H200 at N=4096 (bench/results/nvidia-h200-kernels.csv): in 16-bit, 4 rows per
# program made d weight 10-25% faster than 2; 128-pair tiles made d input 20% (bf16) to 75%
# (TF32) faster than 64; two rows per dot in d input ran 5x slower, so it has one. d weight sums
# over pair tiles in order, so a config's block_n fixes its summation order. "/sm8x": see
# head_forward.FORWARD_TILES; the 16-bit input grad's defaults fit there as they are. d weight
# there: 32-pair tiles in 16-bit, as the symmetric head's 64-pair ones spilled 88-112 B per thread
# with Triton 3.8 and 3.9 on sm_80/86/89 (3.6: none); 16-pair tiles in 3xTF32, as Triton 3.8
# spilled 32-pair ones (648-680 B on sm_80 and sm_86; 3.6 and 3.9 did not). The same Triton 3.8
# (torch 2.14.1's pin) spilled 0.6-17 KB per thread in every pipelined 3xTF32 d weight config with
# 32 or more pairs per tile on sm_90 too (3.6 and 3.9: at most 48 B), so it gets the 16-pair
# config on wgmma GPUs as well (sm_90, and sm_100, which shares the table): spill-free on sm_90,
# never timed. "/sm100": TF32's 128-pair alternative needs 258 KB of shared memory on sm_100 in
# the symmetric head (Triton 3.9; 194 KB on sm_90), more than its 227 KB, so only the default.
WEIGHT_GRAD_TILES = {
    "16bit": [Tiles(64, 4, 8, 2), Tiles(64, 2, 8, 3), Tiles(128, 2, 8, 2)],
    "16bit/sm8x": [Tiles(32, 2, 8, 3)],
    "tf32": [Tiles(64, 2, 8, 3), Tiles(128, 2, 8, 2)],
    "tf32/sm100": [Tiles(64, 2, 8, 3)],
    "tf32/sm8x": [Tiles(64, 1, 8, 2)],
    "tf32x3": [Tiles(16, 1, 8, 2)] if TRITON_VERSION == (3, 8) else [Tiles(64, 2, 8, 2)],
    "tf32x3/sm8x": [Tiles(16, 1, 8, 2)],
    "fp64": [Tiles(32, 1, 4, 2)],
}
INPUT_GRAD_TILES = {
    "16bit": [Tiles(128, 1, 8, 3), Tiles(64, 1, 8, 3)],
    "tf32": [Tiles(128, 1, 8, 3), Tiles(64, 1, 8, 3)],
    "tf32/sm8x": [Tiles(64, 1, 8, 2)],
    "tf32x3": [Tiles(64, 1, 8, 2)],
    "tf32x3/sm8x": [Tiles(32, 1, 8, 2)],
    "fp64": [Tiles(32, 1, 4, 2)],
}


# The K-major grad's pairs are zero-padded to a multiple of this, which every candidate BLOCK_N divides.
PAIR_PADDING = 128


def k_major(dtype):
    """Whether the backward reads its memory operands K-major (see the module docstring): for fp32."""
    return dtype == torch.float32


def zero_padded(x, shape, dtype=None):
    """2-D `x` in the leading corner of a zero tensor of `shape` (and `dtype`, default x's). A
    zero fill of the whole and one copy: the fewest host calls (the 16-bit step is bound by the
    host), at the cost of writing the fp32 transposed copies twice on the GPU (tens of MB)."""
    out = x.new_zeros(shape, dtype=dtype or x.dtype)
    out[:x.shape[0], :x.shape[1]] = x
    return out


def padded_grad(grad_logits, dtype):
    """d loss / d logits ``[N, C]`` as the backward kernels' grad, ``[N, BLOCK_C]`` in `dtype` (the
    operands'), classes zero-padded: 16-byte rows, read unmasked along the classes. A grad that
    is padded already (the fused forward's, or one with C = BLOCK_C) is only cast, if need be."""
    n, classes = grad_logits.shape
    if classes == padded(classes) and grad_logits.is_contiguous():
        return as_dtype(grad_logits, dtype)
    return zero_padded(grad_logits, (n, padded(classes)), dtype)


def grad_operand_dtype(dtype, reduction):
    """The dtype in which the fused forward of a head in `dtype` writes d loss / d logits, as the
    backward's grad operand (zero-padded ``[N, BLOCK_C]``, as padded_grad makes it): the head's
    own, ready for the kernels, which then scale their results by the incoming gradient
    (backend._head_grads); but the loss dtype for "none", whose incoming gradient (one per pair)
    scales the operand before it is rounded, and for fp16, whose range needs GradScaler's scale
    applied before the rounding: d loss / d logits divided by N for "mean" would otherwise lose
    its small values to fp16's subnormals (bf16 has fp32's range)."""
    return dtype if reduction != "none" and dtype != torch.float16 else loss_dtype(dtype)


def empty_grad_operand(like, classes, dtype, reduction):
    """Unfilled d loss / d logits as a fused forward with a head in `dtype` writes it for the
    backward (also its fake kernel's): ``[N, BLOCK_C]`` for N = `like`'s rows, on its device, in
    grad_operand_dtype."""
    return like.new_empty((like.shape[0], padded(classes)), dtype=grad_operand_dtype(dtype, reduction))


class WeightGradOperands(NamedTuple):
    """grad, hs and ts as weight_grad_kernel reads them (weight_grad_operands)."""
    grad: torch.Tensor
    hs: torch.Tensor
    ts: torch.Tensor


def weight_grad_operands(grad, hs, ts):
    """From padded_grad's grad: grad ``[N, BLOCK_C]``, hs and ts ``[N, E]`` as they are, or for fp32
    (K-major) transposed copies, pairs contiguous and zero-padded to N' = N rounded up to
    PAIR_PADDING (read unmasked): ``[BLOCK_C, N']``, ``[E, N']``, ``[E, N']``."""
    if not k_major(grad.dtype):
        return WeightGradOperands(grad, hs, ts)
    n, block_c = grad.shape
    pairs = cdiv(n, PAIR_PADDING) * PAIR_PADDING
    return WeightGradOperands(zero_padded(grad.t(), (block_c, pairs)), zero_padded(hs.t(), (hs.shape[1], pairs)),
                              zero_padded(ts.t(), (ts.shape[1], pairs)))


def input_grad_operand(weight):
    """The weight ``[C, E*B]`` as input_grad_kernel reads it: as it is, or for fp32 (K-major) a
    transposed copy ``[E*B, BLOCK_C]``, classes zero-padded."""
    if not k_major(weight.dtype):
        return weight
    return zero_padded(weight.t(), (weight.shape[1], padded(weight.shape[0])))


def kernel_shapes(emb, classes, block_size, symmetric, precision, dtype):
    """The compile-time arguments both backward kernels take: the head kernels' and K_MAJOR."""
    return dict(head_constants(emb, classes, block_size, symmetric, precision, dtype), K_MAJOR=k_major(dtype))


def launch_weight_grad(operands, dweight, bias_grad, dbias, *, n, block_size, symmetric, precision, scale=None,
                       tiles=None):
    """Fill dweight ``[C, E*B]`` (in any float dtype: written from the fp32 accumulator) from
    weight_grad_operands' result for N pairs, and dbias ``[C]`` (in any float dtype) with the
    column sums of `bias_grad`, ``[N, BLOCK_C]`` in any float dtype (padded_grad's grad, or what it
    was made from, unrounded), both multiplied by `scale` (a one-element tensor; None: by 1); all
    tensors contiguous. `tiles` overrides the default config."""
    classes, emb = dweight.shape[0], dweight.shape[1] // block_size
    dtype = operands.grad.dtype  # the dots' operands' (hs and ts may be wider)
    shapes = kernel_shapes(emb, classes, block_size, symmetric, precision, dtype)
    tiles = tiles or pick_tiles(WEIGHT_GRAD_TILES, dtype, precision, dweight.device)
    launch = tiles.launch_args(block_size)
    grad = operands.grad
    assert not shapes["K_MAJOR"] or grad.shape[1] % launch["BLOCK_N"] == 0, "pad with weight_grad_operands"
    # emb // ROWS programs for d weight, and the last for d bias
    launcher(weight_grad_kernel)[(emb // launch["ROWS"] + 1,)](
        grad, operands.hs, operands.ts, dweight, bias_grad, dbias, scale, n, grad.shape[1], **shapes, **launch,
        HAS_SCALE=scale is not None)


def launch_input_grad(grad, weight, hs, ts, dhs, dts, *, classes, block_size, symmetric, precision, scale=None,
                      tiles=None):
    """Fill dhs and dts ``[N, E]`` (in any float dtype: written from the fp32 accumulators) from
    padded_grad's grad and input_grad_operand's weight (all tensors contiguous; hs and ts may be
    wider than the weight), multiplied by `scale` (a one-element tensor; None: by 1). `tiles`
    overrides the default config."""
    n, emb = hs.shape
    if n == 0:
        return
    tiles = tiles or pick_tiles(INPUT_GRAD_TILES, weight.dtype, precision, hs.device)
    launcher(input_grad_kernel)[(cdiv(n, tiles.block_n), emb // block_size)](
        grad, hs, ts, weight, dhs, dts, scale, n,
        **kernel_shapes(emb, classes, block_size, symmetric, precision, weight.dtype), **tiles.launch_args(block_size),
        HAS_SCALE=scale is not None,
    )
