"""What every Triton kernel of the package shares: tile sizes, the autotune spaces, and the one
tensor-core call (``mma``) whose precision follows PyTorch's TF32 setting."""
import os

import triton
import triton.language as tl

from .._dispatch import TRITON_INTERPRET

# NCRL_TRITON_AUTOTUNE=0 runs every kernel with its first config instead of tuning. The tests set
# it: results must not depend on the config (test_triton.py checks each config once at DocRED
# size), and tuning every kernel variant for every small test shape would compile for minutes.
AUTOTUNE = os.environ.get("NCRL_TRITON_AUTOTUNE", "1") != "0"

# tl.dot needs every dimension of its operands to be at least 16.
MIN_DOT = 16

# Loss kinds as the kernels see them (a compile-time constant: one variant per loss).
HEAD_ONLY = tl.constexpr(0)
NCRL = tl.constexpr(1)
ATL = tl.constexpr(2)
BCE = tl.constexpr(3)
LOSS_CODES = {"ncrl": 1, "atl": 2, "bce": 3}


def padded(size):
    """A tile dimension covering `size` (classes C, or one group's B feature columns): a power of
    two for tl.arange, at least 16 for tl.dot; the padding is masked to zero."""
    return max(MIN_DOT, triton.next_power_of_2(size))


def pair_bucket(n):
    """The autotune key for the number of pairs N: its power of two, clamped to [256, 16384].
    N itself is a runtime argument that is not specialised on (``do_not_specialize``), so a new
    N reuses the compiled kernels and the tuned config of its bucket instead of recompiling."""
    return min(max(triton.next_power_of_2(n), 256), 16384)


def autotune(gpu_configs, interpreter_config, key=("N_BUCKET", "E", "B", "C", "SYMMETRIC", "ALLOW_TF32")):
    """triton.autotune over a few configs, keyed on shape buckets and the compile-time switches
    that change a kernel's cost (the autotuner adds the pointer dtypes to the key). The interpreter cannot time kernels, so it runs `interpreter_config` alone;
    large tiles there mean few Python-level steps."""
    if TRITON_INTERPRET:
        configs = [interpreter_config]
    else:
        configs = gpu_configs if AUTOTUNE else gpu_configs[:1]
    return triton.autotune(configs=configs, key=list(key))


def config(num_warps, num_stages, **blocks):
    return triton.Config(dict(blocks), num_warps=num_warps, num_stages=num_stages)


@triton.jit
def mma(a, b, acc, ALLOW_TF32: tl.constexpr):
    """acc + a @ b with acc's dtype (fp32, or fp64 for fp64 operands).

    fp32 operands use TF32 tensor cores only when ALLOW_TF32 (the caller passes
    torch.backends.cuda.matmul.allow_tf32, as cuBLAS follows it), else exact IEEE fp32. bf16/fp16
    operands always run on tensor cores with fp32 accumulation; fp64 operands use Triton's FMA
    path. The precision is passed explicitly so it never depends on Triton's own default (TF32).
    The interpreter ignores input_precision and computes in the accumulator's dtype.
    """
    if ALLOW_TF32:
        return tl.dot(a, b, acc, input_precision="tf32", out_dtype=acc.dtype)
    else:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
