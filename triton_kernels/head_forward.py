"""Forward of the group-bilinear head, split over the E*B reduction:

    partial[k, n, c] = sum over the feature rows s of split k of kron(hs_g, ts_g)[n, s*B + j] * W[c, s*B + j]

without ever writing the [N, E*B] feature; the epilogue kernel (loss_rows.py) sums the partials
in a fixed order, adds the bias, writes the logits and runs the loss.

Work split: a 2-D grid of (pair tiles of BLOCK_N pairs) x (SPLIT contiguous ranges of feature
rows), so that the grid covers the GPU at any N (at N=4096 there are only 32 tiles of 128 pairs
for 132 SMs). Each program walks its feature rows ROWS at a time in one flat loop (no inner group
loop that would drain the load pipeline at every group boundary): step s0 builds the
[BLOCK_N, ROWS*B] slice hs[:, s0 + r] * ts[:, g*B + j] of the Kronecker feature in registers
(r < ROWS, j < B, g = s0 // B) and multiplies it with the matching [ROWS*B, C] weight slice on
tensor cores, accumulating in fp32 (fp64 for fp64 inputs). ts's group columns and the weight
slice are reloaded every step: their loads are contiguous, so Triton pipelines them through
shared memory (cp.async), where holding them across steps would cost registers.
"""
import torch
import triton
import triton.language as tl

from ._common import TRITON_INTERPRET, Tiles, cdiv, mma, padded, pick_tiles, rows_per_step, sm_count
from ._launch import launcher


@triton.jit
def rows_of(x, rows, row_ok, s0, E: tl.constexpr, ROWS: tl.constexpr):
    """Columns s0 .. s0 + ROWS - 1 of x ([N, E]) for a pair tile, ``[BLOCK_N, ROWS]``."""
    return tl.load(x + rows[:, None] * E + s0 + tl.arange(0, ROWS)[None, :], mask=row_ok[:, None], other=0.0)


@triton.jit
def rounded(x, OPERAND: tl.constexpr, COMPUTE: tl.constexpr):
    """hs or ts values rounded to the dots' operand dtype (the weight's), in the compute dtype.
    hs and ts may come in a wider dtype than the weight (fp32 under autocast, uncast: see
    _op_autograd.OpFamily), and eager autocast rounds them before it multiplies; for inputs
    already in the operand dtype the rounding is no instruction at all."""
    return x.to(OPERAND).to(COMPUTE)


@triton.jit
def kron_rows(hs, ts, h_rows, t_rows, rows, row_ok, g, E: tl.constexpr, B: tl.constexpr, SYMMETRIC: tl.constexpr,
              COMPUTE: tl.constexpr, OPERAND: tl.constexpr, BLOCK_J: tl.constexpr):
    """Feature rows s0 .. s0 + ROWS - 1 of group g for a pair tile, ``[BLOCK_N, ROWS, BLOCK_J]`` in
    the dot's operand dtype, from h_rows = hs[:, s0 + r] and (symmetric) t_rows = ts[:, s0 + r]:
    hs[n, s0 + r] * ts[n, g*B + j] (symmetric: max(hs_i ts_j, hs_j ts_i) with i = s0 + r - g*B),
    of hs and ts values rounded to the operand dtype. Padding columns j >= B are 0. Products of
    bf16/fp16 values are exact in the compute dtype and each is rounded once to the operand dtype,
    which the compiler does in one packed 16-bit multiply (HMUL2). The symmetric max is taken after
    that rounding: rounding is monotonic, so this is the rounded exact max (and what eager's bf16
    torch.maximum computes), while a max of fp32 products took 2.8x the instructions per step
    (sm_90 SASS, bf16)."""
    js = tl.arange(0, BLOCK_J)
    group_ok = row_ok[:, None] & (js[None, :] < B)
    at_group = rows[:, None] * E + g * B + js[None, :]
    t_group = rounded(tl.load(ts + at_group, mask=group_ok, other=0.0), OPERAND, COMPUTE)
    x = (rounded(h_rows, OPERAND, COMPUTE)[:, :, None] * t_group[:, None, :]).to(OPERAND)
    if SYMMETRIC:
        h_group = rounded(tl.load(hs + at_group, mask=group_ok, other=0.0), OPERAND, COMPUTE)
        # (Triton computes a max of two bf16 tensors in fp32; the result is exact either way.)
        x = tl.maximum(x, (rounded(t_rows, OPERAND, COMPUTE)[:, :, None] * h_group[:, None, :]).to(OPERAND)).to(OPERAND)
    return x


@triton.jit
def weight_rows_at(E: tl.constexpr, B: tl.constexpr, BLOCK_J: tl.constexpr, ROWS: tl.constexpr):
    """Offsets within the weight's row of feature row r (< ROWS), column j (< BLOCK_J) of a step,
    as one index k = r * BLOCK_J + j of the tl.dot's K dimension: r * B + j, and whether j < B."""
    ks = tl.arange(0, ROWS * BLOCK_J)
    return (ks // BLOCK_J) * B + ks % BLOCK_J, (ks % BLOCK_J) < B


@triton.jit(do_not_specialize=["N", "STEPS_PER_SPLIT"])
def head_forward_kernel(
    hs, ts, weight, partial, N, STEPS_PER_SPLIT,
    E: tl.constexpr, B: tl.constexpr, C: tl.constexpr,
    SYMMETRIC: tl.constexpr, PRECISION: tl.constexpr, COMPUTE_FP64: tl.constexpr,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, ROWS: tl.constexpr,
):
    COMPUTE: tl.constexpr = tl.float64 if COMPUTE_FP64 else tl.float32
    split = tl.program_id(1)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows = rows.to(tl.int64)  # row offsets n*E stay exact for any N
    cs = tl.arange(0, BLOCK_C)
    k_at, k_ok = weight_rows_at(E, B, BLOCK_J, ROWS)
    # Weight slice of a step as a [ROWS*BLOCK_J, BLOCK_C] operand: weight[c, s0*B + k_at].
    w_at = cs.to(tl.int64)[None, :] * (E * B) + k_at[:, None]
    w_ok = k_ok[:, None] & (cs[None, :] < C)

    acc = tl.zeros([BLOCK_N, BLOCK_C], dtype=COMPUTE)
    first = split * STEPS_PER_SPLIT
    last = tl.minimum(first + STEPS_PER_SPLIT, E // ROWS)
    # hs's (and ts's) ROWS columns of a step are loaded one step ahead: a load of a few bytes per
    # pair is not pipelined through shared memory, and its latency would stall every step.
    h_next = rows_of(hs, rows, row_ok, first * ROWS, E, ROWS)
    t_next = h_next
    if SYMMETRIC:
        t_next = rows_of(ts, rows, row_ok, first * ROWS, E, ROWS)
    for step in range(first, last):
        s0 = step * ROWS
        h_rows, t_rows = h_next, t_next
        ahead = (s0 + ROWS) % E  # the last step loads the first rows again, unused
        h_next = rows_of(hs, rows, row_ok, ahead, E, ROWS)
        if SYMMETRIC:
            t_next = rows_of(ts, rows, row_ok, ahead, E, ROWS)
        x = kron_rows(hs, ts, h_rows, t_rows, rows, row_ok, s0 // B, E, B, SYMMETRIC, COMPUTE,
                      weight.dtype.element_ty, BLOCK_J)
        w = tl.load(weight + w_at + s0 * B, mask=w_ok, other=0.0)
        acc = mma(tl.reshape(x, [BLOCK_N, ROWS * BLOCK_J]), w, acc, PRECISION)
    at = split.to(tl.int64) * N * C + rows[:, None] * C + cs[None, :]
    tl.store(partial + at, acc, mask=row_ok[:, None] & (cs[None, :] < C))


# Candidate configs per operand kind (_common.operand_kind), the default first; compile_check
# compiles them all for sm_90 (the plain head's 16-bit and TF32 defaults without spills, the others
# within compile_check.SPILL_LIMIT; shared memory within an H100's) and
# bench/kernels.py times them. 16-bit: 128-pair tiles, two feature rows per tl.dot (K=128 for
# B=64), 3 stages; TF32 tiles are twice the bytes, so 2 stages; 3xTF32 holds three operand
# splits, so one row per dot. "/sm8x": for GPUs without wgmma (_common.table_key), from the
# sm_80, sm_86 and sm_89 compiles (untimed: no such GPU has run them): one row per dot, as two spill or
# overflow shared memory there; 16-bit 2 stages, as 3 needed 104 KB in the symmetric head with
# fp32 hs and ts (autocast from fp32 activations), over sm_86's and sm_89's 99; 3xTF32 16-pair tiles, as Triton 3.8 spilled 32-pair ones (16 B per
# thread on sm_86; Triton 3.6 and 3.9 did not), at the cost of reading W once per 16 pairs.
FORWARD_TILES = {
    "16bit": [Tiles(128, 2, 8, 3), Tiles(64, 2, 4, 3), Tiles(128, 4, 8, 2)],
    "16bit/sm8x": [Tiles(64, 1, 8, 2)],
    "tf32": [Tiles(128, 2, 8, 2), Tiles(64, 2, 4, 2)],
    "tf32/sm8x": [Tiles(64, 1, 8, 2)],
    "tf32x3": [Tiles(64, 1, 8, 2)],
    "tf32x3/sm8x": [Tiles(16, 1, 8, 2)],
    "fp64": [Tiles(64, 1, 4, 2)],
    "fp64/sm8x": [Tiles(16, 1, 4, 2)],
}

# Each split covers at least this many steps, so a program's pipeline has time to fill.
MIN_STEPS_PER_SPLIT = 16


# Programs per SM the forward's default split aims at: two halve the tail of the last wave (on
# the H200, splits for 2 programs per SM ran 5-25% faster than for 1; bench/kernels.py).
PROGRAMS_PER_SM = 2


def row_steps(tiles, emb, block_size):
    """The forward's steps: E feature rows, ROWS per tl.dot."""
    return emb // rows_per_step(block_size, tiles.rows)


def split_count(tiles, n, emb, block_size, device):
    """Partial sums over the row steps for `device`: split_for its SM count."""
    return split_for(tiles, n, emb, block_size, sm_count(device))


def split_for(tiles, n, emb, block_size, sms):
    """Partial sums over the row steps on a GPU of `sms` SMs: tiles.split, or (0) enough for
    PROGRAMS_PER_SM programs per SM, each split at least MIN_STEPS_PER_SPLIT steps; never an empty
    split. (bench/roofline.py models the same split.)"""
    steps = row_steps(tiles, emb, block_size)
    split = tiles.split or cdiv(PROGRAMS_PER_SM * sms, cdiv(max(n, 1), tiles.block_n))
    split = max(1, min(split, steps // MIN_STEPS_PER_SPLIT if not TRITON_INTERPRET else steps))
    return cdiv(steps, cdiv(steps, split))


def head_constants(emb, classes, block_size, symmetric, precision, dtype):
    """The compile-time arguments every head kernel takes, forward and backward, for inputs of
    `dtype` (compile_check compiles with the same)."""
    return dict(E=emb, B=block_size, C=classes, SYMMETRIC=symmetric, PRECISION=precision,
                COMPUTE_FP64=dtype == torch.float64, BLOCK_J=padded(block_size), BLOCK_C=padded(classes))


def launch_head_forward(hs, ts, weight, *, block_size, symmetric, precision, tiles=None):
    """Partial logits ``[SPLIT, N, C]`` in the compute dtype (fp32, fp64 for fp64 inputs): their
    sum over the first dimension is hs, ts's head without the bias, run in the weight's dtype (hs
    and ts may be wider: rounded to it as they are loaded). All tensors contiguous. `tiles`
    overrides the default config (benchmarks and tests)."""
    n, emb = hs.shape
    classes, dtype = weight.shape[0], weight.dtype
    tiles = tiles or pick_tiles(FORWARD_TILES, dtype, precision, hs.device)
    steps = row_steps(tiles, emb, block_size)
    split = split_count(tiles, n, emb, block_size, hs.device)
    partial = hs.new_empty((split, n, classes), dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    if n == 0:
        return partial
    launcher(head_forward_kernel)[(cdiv(n, tiles.block_n), split)](
        hs, ts, weight, partial, n, cdiv(steps, split),
        **head_constants(emb, classes, block_size, symmetric, precision, dtype), **tiles.launch_args(block_size),
    )
    return partial
