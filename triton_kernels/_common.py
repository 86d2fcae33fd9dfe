"""What every Triton kernel of the package shares: tile padding, the launch configs (chosen from
the shape and the GPU, never by timing), the fp32 matmul precision, and the one tensor-core call
(``mma``)."""
import dataclasses
import functools
import os

import torch
import triton
import triton.language as tl

from .._dispatch import TRITON_INTERPRET, cuda_capability, cuda_index, major_minor

# Some defaults depend on the Triton release that compiles them (head_backward.WEIGHT_GRAD_TILES).
TRITON_VERSION = major_minor(triton.__version__)

# tl.dot needs every dimension of its operands to be at least 16.
MIN_DOT = 16

# Loss kinds as the kernels see them (a compile-time constant: one variant per loss).
HEAD_ONLY = tl.constexpr(0)
NCRL = tl.constexpr(1)
ATL = tl.constexpr(2)
BCE = tl.constexpr(3)
LOSS_CODES = {"ncrl": 1, "atl": 2, "bce": 3}


# Host-side arithmetic for launches in plain Python: triton.cdiv and triton.next_power_of_2 are
# jit functions, which cost microseconds per call from Python, on every launch.


def cdiv(a, b):
    return -(-a // b)


def padded(size):
    """A tile dimension covering `size` (classes C, or one group's B feature columns): a power of
    two for tl.arange, at least 16 for tl.dot; the padding is masked to zero."""
    return max(MIN_DOT, 1 << (size - 1).bit_length())


def rows_per_step(block_size, wanted):
    """How many feature rows of a group one tl.dot covers: `wanted` (a power of two), halved
    until it divides the block size (an odd block size gets 1)."""
    rows = wanted
    while block_size % rows:
        rows //= 2
    return rows


# Compile options every launch passes. FP fusion (a*b + c as one FMA) is what Triton 3.6 to
# 3.9 do by default and what the GPU runs measured. Triton 3.9 warns (once per process) that its
# default turns to off in 3.10, which would change the kernels' numerics with the release, so it
# is asked for explicitly, unless the user chose a default (TRITON_DEFAULT_FP_FUSION, read here at import);
# TRITON_FORCE_DISABLE_FP_FUSION (3.9) still turns it off. Under torch.compile, Inductor compiles
# the kernels with options of its own and drops this one (torch 2.13's source; not run on a GPU).
COMPILE_OPTIONS = {} if "TRITON_DEFAULT_FP_FUSION" in os.environ else dict(enable_fp_fusion=True)


@dataclasses.dataclass(frozen=True)
class Tiles:
    """One kernel's launch config: the pair tile, the feature rows per tl.dot, warps and stages.
    `split` is the forward's number of partial sums over the E*B reduction (0: enough for every
    SM to get a program; unused elsewhere)."""

    block_n: int
    rows: int
    num_warps: int
    num_stages: int
    split: int = 0

    def launch_args(self, block_size):
        return dict(BLOCK_N=self.block_n, ROWS=rows_per_step(block_size, self.rows), num_warps=self.num_warps,
                    num_stages=self.num_stages, **COMPILE_OPTIONS)


def operand_kind(dtype, precision):
    """What sizes a kernel's tiles: 16-bit operands, fp32 as TF32 or 3xTF32 (3 dots, 3x the
    registers), or fp64."""
    if dtype == torch.float64:
        return "fp64"
    if dtype == torch.float32:
        if precision not in (TF32, TF32X3):
            raise ValueError(f"fp32 inputs run as {TF32!r} or {TF32X3!r} (precision_for), got precision {precision!r}")
        return precision
    return "16bit"


# The interpreter ignores warps and stages; small tiles keep it fast while still running several
# programs, row steps and (in the forward) partial sums.
INTERPRETER_TILES = Tiles(block_n=32, rows=2, num_warps=1, num_stages=1, split=3)


# The candidate lists are tuned on Hopper (sm_90: wgmma, 227 KB of shared memory per block).
# GPUs with mma.sync tensor cores instead (sm_80/86/89: A100, RTX 30xx/40xx, A10, A40, L4, L40S;
# and sm_120) take a table's "<kind>/sm8x" list where it has one: configs that compile_check keeps
# within sm_86's 99 KB and, in the plain head, without spills on sm_80, sm_86 and sm_89, where
# Hopper's defaults need up to 160 KB or spill kilobytes. sm_100 (tcgen05) takes Hopper's lists,
# or a "<kind>/sm100" list where a Hopper candidate does not fit its shared memory (compile_check).
WGMMA_MAJORS = (9, 10)
SM8X = "sm8x"
SM100 = "sm100"


def table_key(table, kind, capability):
    """The key of `table` (operand kind -> candidate configs) that a GPU of compute capability
    `capability` (major, minor) launches `kind` operands with."""
    own = f"{kind}/{SM8X}" if capability[0] not in WGMMA_MAJORS else f"{kind}/{SM100}" if capability[0] == 10 else None
    return own if own in table else kind


def candidate_tiles(table, dtype, precision, device):
    """A kernel's candidate configs for these operands on this device (`table`: operand kind ->
    configs), the default first; the interpreter's one config under TRITON_INTERPRET."""
    kind = operand_kind(dtype, precision)  # checks the precision on the interpreter too
    if TRITON_INTERPRET:
        return [INTERPRETER_TILES]
    return table[table_key(table, kind, cuda_capability(cuda_index(device)))]


def pick_tiles(table, dtype, precision, device):
    """The config a kernel launches with: the first of its candidates. Chosen from the operands
    and the device alone, never by timing, so results are the same in every process (docs/spec.md,
    determinism), and nothing is tuned at run time."""
    return candidate_tiles(table, dtype, precision, device)[0]


INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def multiprocessors(device_index):
    """SM count of a CUDA device (the forward splits its reduction to cover them)."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device):
    if TRITON_INTERPRET:
        return INTERPRETER_SMS
    return multiprocessors(cuda_index(device))


# fp32 matmul precision as a kernel constant. "ieee" is also what bf16/fp16 and fp64 operands
# pass: tl.dot ignores it for them (fp64 runs on Triton's FMA/DMMA path).
TF32 = "tf32"
TF32X3 = "tf32x3"
IEEE = "ieee"


@torch.compiler.assume_constant_result
def fp32_matmul_precision():
    """How PyTorch multiplies fp32 matrices here, as a tl.dot precision: TF32 when PyTorch allows
    it (torch.set_float32_matmul_precision("high"), torch.backends.cuda.matmul.fp32_precision =
    "tf32", the legacy allow_tf32 = True, or TORCH_ALLOW_TF32_CUBLAS_OVERRIDE=1), else 3xTF32,
    which is about as accurate as IEEE fp32 on tensor cores. Reads `fp32_precision`, which
    resolves all of those and, unlike the legacy flag, never raises once the new API is used.
    Dynamo cannot trace that read, so under torch.compile it is taken once, when the graph is
    compiled (a constant without a guard: set the precision before compiling)."""
    return TF32 if torch.backends.cuda.matmul.fp32_precision == "tf32" else TF32X3


def precision_for(dtype):
    return fp32_matmul_precision() if dtype == torch.float32 else IEEE


@triton.jit
def mma(a, b, acc, PRECISION: tl.constexpr):
    """acc + a @ b with acc's dtype (fp32, or fp64 for fp64 operands), at the given fp32 precision
    ("tf32", "tf32x3"; "ieee" for other dtypes). The interpreter ignores the precision and
    computes in the accumulator's dtype."""
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)
