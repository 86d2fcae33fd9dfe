"""Compile the Triton kernels for real GPU targets without a GPU, and report registers and stack
(spill) bytes per thread from cuobjdump. Needs Triton's NVIDIA backend (its bundled ptxas and
cuobjdump), not a GPU; run it without TRITON_INTERPRET:

    python -m ncrl_kernels.triton_kernels.compile_check                      # DocRED shapes, sm_90a
    python -m ncrl_kernels.triton_kernels.compile_check --archs 80 90 --all-configs

The interpreter tests check what the kernels compute; this checks that Triton compiles them for
the GPU (types, layouts, tl.dot shapes) and shows which autotune configs spill registers.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget

from . import head_backward, head_forward, loss_rows
from ._common import LOSS_CODES, padded

# Input dtypes; "tf32" is fp32 inputs with torch.backends.cuda.matmul.allow_tf32 set, "fp32" without.
POINTER = {"fp32": "*fp32", "tf32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


def variants(dtype, emb, block, classes):
    """(name, kernel, pointer types (None: argument not passed), constexprs) of every kernel
    variant the backend launches for inputs of `dtype`."""
    ptr = POINTER[dtype]
    loss_ptr = "*fp64" if dtype == "fp64" else "*fp32"
    shape = dict(E=emb, B=block, C=classes, BLOCK_J=padded(block), BLOCK_C=padded(classes),
                 ALLOW_TF32=dtype == "tf32", COMPUTE_FP64=dtype == "fp64")
    out = []
    for symmetric in (False, True):
        common = dict(shape, SYMMETRIC=symmetric)
        out.append((f"fused forward ncrl sym={symmetric}", head_forward.head_forward_kernel,
                    dict(hs=ptr, ts=ptr, weight=ptr, bias=ptr, labels=loss_ptr, logits=ptr, dlogits=loss_ptr,
                         row_loss=loss_ptr),
                    dict(common, HAS_BIAS=True, LOSS=LOSS_CODES["ncrl"], GAMMA=0.05, MARGIN_REG=True, MEAN=True)))
        out.append((f"weight grad sym={symmetric}", head_backward.weight_grad_kernel,
                    dict(grad=loss_ptr, hs=ptr, ts=ptr, dweight=ptr, dbias=loss_ptr),
                    dict(common, BLOCK_N=head_backward.WEIGHT_GRAD_BLOCK_N)))
        out.append((f"input grad sym={symmetric}", head_backward.input_grad_kernel,
                    dict(grad=loss_ptr, hs=ptr, ts=ptr, weight=ptr, dhs=ptr, dts=ptr), common))
    out.append(("head forward", head_forward.head_forward_kernel,
                dict(hs=ptr, ts=ptr, weight=ptr, bias=None, labels=None, logits=ptr, dlogits=None, row_loss=None),
                dict(shape, SYMMETRIC=False, HAS_BIAS=False, LOSS=0, GAMMA=0.0, MARGIN_REG=False, MEAN=False)))
    if dtype in ("fp32", "fp64"):  # the loss-only kernel sees fp32 (or fp64) logits, no matmul
        for name, code in LOSS_CODES.items():
            out.append((f"loss {name}", loss_rows.loss_kernel,
                        dict(logits=loss_ptr, labels=loss_ptr, dlogits=loss_ptr, row_loss=loss_ptr),
                        dict(C=classes, BLOCK_C=padded(classes), LOSS=code, GAMMA=0.05 if name == "ncrl" else 0.0,
                             MARGIN_REG=True, MEAN=True)))
    return out


def compile_variant(kernel, pointers, constexprs, config, target):
    fn = kernel.fn  # the JITFunction under the autotuner
    constants = dict(constexprs, **config.kwargs)
    signature = {}
    for name in fn.arg_names:
        if name in pointers and pointers[name] is None:
            constants[name] = None
        signature[name] = "constexpr" if name in constants else pointers.get(name, "i32")
    source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants)
    return triton.compile(source, target=target,
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def resource_usage(cubin):
    """(registers, stack bytes) per thread; a stack means spilled registers."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (-1, -1)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(POINTER), default=["fp32", "tf32", "bf16", "fp16",
                                                                                   "fp64"])
    parser.add_argument("--archs", nargs="+", type=int, default=[90], help="compute capabilities, e.g. 80 90")
    parser.add_argument("--emb", type=int, default=768)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--classes", type=int, default=97)
    parser.add_argument("--all-configs", action="store_true", help="every autotune config, not just the first")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    failures = 0
    print(f"triton {triton.__version__}  E={args.emb} B={args.block} C={args.classes}")
    for arch in args.archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in args.dtypes:
            for name, kernel, pointers, constexprs in variants(dtype, args.emb, args.block, args.classes):
                for config in kernel.configs if args.all_configs else kernel.configs[:1]:
                    label = (f"sm_{arch} {dtype:4s} {name:28s} {str(config.kwargs):36s} "
                             f"w{config.num_warps} s{config.num_stages}")
                    start = time.time()
                    try:
                        compiled = compile_variant(kernel, pointers, constexprs, config, target)
                    except Exception as exc:  # report every failure, then exit non-zero
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {exc}"[:3000], flush=True)
                        continue
                    ptx = compiled.asm["ptx"]
                    unit = "wgmma" if "wgmma" in ptx else "mma" if "mma.sync" in ptx else "fma"
                    regs, stack = resource_usage(compiled.asm["cubin"])
                    print(f"ok   {label} regs={regs:3d} stack={stack:5d} {unit:5s} {time.time() - start:4.1f}s",
                          flush=True)
    print(f"{failures} failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
