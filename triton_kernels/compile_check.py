"""Compile the Triton kernels for real GPU targets without a GPU and check what the compiler made
of them. Needs Triton's NVIDIA backend (its bundled ptxas and cuobjdump), not a GPU; run it
without TRITON_INTERPRET:

    python -m ncrl_kernels.triton_kernels.compile_check                      # DocRED shapes, sm_90
    python -m ncrl_kernels.triton_kernels.compile_check --archs 80 86 90 --all-configs

Each target compiles the candidates a GPU of its compute capability launches
(_common.table_key): sm_80/86/89 and sm_120 take the "/sm8x" lists where a kernel has one, sm_100
its "/sm100" list or Hopper's.

Kernels are compiled as a launch compiles them: pointer arguments 16-byte aligned (PyTorch's
allocations are), so loads vectorise and pipeline as they will on the GPU. Per kernel variant
and config it reports registers and spill stack per thread (cuobjdump), shared memory, the
tensor-core instruction the dots became (wgmma on sm_90, tcgen05 on sm_100, mma.sync on sm_8x, or
FMA), on sm_90 whether the main loop keeps wgmmas in flight ("async") or waits for each
("serial", ``wgmma_serialized``; reported, not failed), and the asynchronous copies (cp.async)
that pipeline the loads, by width. 16-bit kernels are compiled from 16-bit and from fp32 hs and ts. It fails (exit status 1) when a
variant does not compile, when a config needs more shared memory than the target has, when a
matmul kernel's default config pipelines no load, when the plain head's default config spills in
16-bit or TF32 (sm_80/86/89/90) or 3xTF32 (sm_80/86/89), on sm_90 (the tuned target) when a default
config has no 16-byte copy (its dot operands are being transposed on the way in; see
head_backward.py), and on sm_90 when a bf16/fp16/TF32 default's dots are not wgmma. Smaller
spills are reported, not failed, for the symmetric head (it holds two more [BLOCK_N, B] tiles and
sits at the register limit: a few dozen bytes spill or not depending on the Triton version and
target), for 3xTF32 on sm_90 (its three operand splits) and for the epilogues, up to SPILL_LIMIT
bytes per thread; fp64 (tests only) may spill any amount.
"""
import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time

import torch
import triton
from triton.backends.compiler import GPUTarget

from . import head_backward, head_forward, loss_rows
from ._common import COMPILE_OPTIONS, IEEE, LOSS_CODES, TF32, TF32X3, padded, rows_per_step, table_key

# Benchmark dtypes: (torch dtype, pointer type, precision). "fp32" is fp32 inputs at PyTorch's
# default precision ("highest", run as 3xTF32), "tf32" with TF32 allowed.
DTYPES = {"fp32": (torch.float32, "*fp32", TF32X3), "tf32": (torch.float32, "*fp32", TF32),
          "bf16": (torch.bfloat16, "*bf16", IEEE), "fp16": (torch.float16, "*fp16", IEEE),
          "fp64": (torch.float64, "*fp64", IEEE)}
# Shared memory per block (the opt-in limit) of the targets checked: A100, RTX 30xx/A10/A40, RTX
# 40xx/L4/L40S, H100/H200.
SHARED_MEMORY = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024, 100: 227 * 1024, 120: 99 * 1024}
MATMUL_KERNELS = ("forward", "weight grad", "input grad")
# The most spill stack any default config may have, per thread (fp64 aside): the register-bound
# variants spill up to about 200 B; a release that needs kilobytes (Triton 3.8's 3xTF32 d weight
# on sm_90 with 64-pair tiles: 5 KB) turns a kernel's inner loop into local-memory traffic.
SPILL_LIMIT = 256


def kind_of(dtype):
    return {"bf16": "16bit", "fp16": "16bit", "fp64": "fp64", "tf32": "tf32", "fp32": "tf32x3"}[dtype]


def variants(dtype, emb, block, classes, all_configs, arch):
    """(name, kernel, pointer types (None: argument not passed), constexprs, configs) of every
    kernel variant the backend launches for inputs of `dtype` on sm_`arch` (whose compute
    capability picks the candidate list, as on a GPU); configs are (Tiles or None, is_default)."""
    torch_dtype, ptr, precision = DTYPES[dtype]
    loss_ptr = "*fp64" if dtype == "fp64" else "*fp32"
    # 16-bit d weight as under autocast with an fp32 weight (ATLOP's AMP), written in fp32 from
    # the accumulator; 16-bit parameters' d weight differs only in that final store.
    dweight_ptr = "*fp32" if dtype in ("bf16", "fp16") else ptr
    # The fused forward's d loss / d logits, as the backward reads it (mean and sum).
    grad_ptr = ptr if head_backward.grad_operand_dtype(torch_dtype, "mean") == torch_dtype else loss_ptr
    kind = kind_of(dtype)

    def tiles(table):
        candidates = table[table_key(table, kind, divmod(arch, 10))]
        candidates = candidates if all_configs else candidates[:1]
        return [(t, i == 0) for i, t in enumerate(candidates)]

    # 16-bit heads take hs and ts in 16 bits (ATLOP's, outputs of autocast linears) or, uncast,
    # in fp32 (autocast from fp32 activations, as bench/run.py's): the kernels round them as they
    # load them (head_forward.rounded), and write their gradients in their dtype.
    inputs = (ptr, "*fp32") if dtype in ("bf16", "fp16") else (ptr,)
    out = []
    for symmetric, x in ((symmetric, x) for symmetric in (False, True) for x in inputs):
        suffix = f"sym={symmetric}" + (" fp32 hs" if x != ptr else "")
        forward = head_forward.head_constants(emb, classes, block, symmetric, precision, torch_dtype)
        backward = head_backward.kernel_shapes(emb, classes, block, symmetric, precision, torch_dtype)
        out.append((f"forward {suffix}", head_forward.head_forward_kernel,
                    dict(hs=x, ts=x, weight=ptr, partial=loss_ptr), forward, tiles(head_forward.FORWARD_TILES)))
        # As a fused op's mean or sum backward launches them: its incoming gradient scales the
        # results where the forward wrote the grad operand in the head's dtype; where it wrote it
        # wider (fp16), the backward scales it before its rounding and d bias is summed from it
        # (head_backward.grad_operand_dtype). Without the scale (the head op's backward, "none",
        # the operators' route) they lack one multiply and are not compiled separately.
        scaled = dict(backward, HAS_SCALE=grad_ptr == ptr)
        out.append((f"weight grad {suffix}", head_backward.weight_grad_kernel,
                    dict(grad=ptr, hs=x, ts=x, dweight=dweight_ptr, bias_grad=grad_ptr, dbias=loss_ptr,
                         scale=loss_ptr), scaled, tiles(head_backward.WEIGHT_GRAD_TILES)))
        out.append((f"input grad {suffix}", head_backward.input_grad_kernel,
                    dict(grad=ptr, hs=x, ts=x, weight=ptr, dhs=x, dts=x, scale=loss_ptr), scaled,
                    tiles(head_backward.INPUT_GRAD_TILES)))
    # The fused op's: d loss / d logits as the backward's padded grad operand (mean and sum; the
    # loss-only op's differ in its columns).
    epilogue = dict(C=classes, BLOCK_C=padded(classes), BLOCK_N=loss_rows.EPILOGUE_ROWS, GRAD_COLS=padded(classes))
    pointers = dict(partial=loss_ptr, bias=loss_ptr, labels=loss_ptr, logits=ptr, dlogits=grad_ptr,
                    row_loss=loss_ptr)
    out.append(("epilogue head only", loss_rows.epilogue_kernel, pointers,
                dict(epilogue, HAS_BIAS=True, WRITE_LOGITS=True, LOSS=0, GAMMA=0.0, MARGIN_REG=False, MEAN=False),
                [(None, True)]))
    for name, code in LOSS_CODES.items():
        out.append((f"epilogue {name}", loss_rows.epilogue_kernel, pointers,
                    dict(epilogue, HAS_BIAS=True, WRITE_LOGITS=True, LOSS=code, GAMMA=0.05 if name == "ncrl" else 0.0,
                         MARGIN_REG=True, MEAN=True), [(None, True)]))
    # The loss-only op's: its logits as the one partial, d loss / d logits [N, C] in the loss dtype.
    out.append(("epilogue ncrl loss only", loss_rows.epilogue_kernel,
                dict(partial=loss_ptr, labels=loss_ptr, dlogits=loss_ptr, row_loss=loss_ptr, bias=None, logits=None),
                dict(epilogue, GRAD_COLS=classes, HAS_BIAS=False, WRITE_LOGITS=False, LOSS=LOSS_CODES["ncrl"],
                     GAMMA=0.05, MARGIN_REG=True, MEAN=True), [(None, True)]))
    return out


def compile_variant(kernel, pointers, constexprs, num_warps, num_stages, target):
    constants = dict(constexprs)
    signature, attrs = {}, {}
    for index, name in enumerate(kernel.arg_names):
        if name in pointers and pointers[name] is None:
            constants[name] = None
        signature[name] = "constexpr" if name in constants else pointers.get(name, "i32")
        # As a launch specialises: PyTorch's allocations are 16-byte aligned, and row strides are
        # padded to multiples of 16 elements (head_backward.padded_grad, weight_grad_operands).
        if signature[name].startswith("*") or name.endswith("_stride"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constants, attrs=attrs)
    return triton.compile(source, target=target,
                          options={"num_warps": num_warps, "num_stages": num_stages, **COMPILE_OPTIONS})


def cuobjdump(option, cubin):
    """The output of Triton's bundled cuobjdump `option` (e.g. "-sass") on a cubin."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        return subprocess.run([tool, option, f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)


def resource_usage(cubin):
    """(registers, stack bytes) per thread; a stack means spilled registers."""
    found = re.search(r"REG:(\d+) STACK:(\d+)", cuobjdump("-res-usage", cubin))
    return (int(found.group(1)), int(found.group(2))) if found else (-1, -1)


def sass_of(cubin):
    """The SASS of a cubin (cuobjdump -sass) as (address, opcode, operands) per instruction."""
    out = cuobjdump("-sass", cubin)
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)([^;]*);", out)
    return [(int(address, 16), opcode, operands) for address, opcode, operands in found]


def wgmma_serialized(sass):
    """Whether the main loop (the longest backward branch) waits for each wgmma (HGMMA) before
    the next is issued: as many waits for none outstanding (WARPGROUP.DEPBAR.LE gsb0, 0x0) as
    HGMMAs, so the tensor cores idle while the warps build the next operand. ptxas (12.8, Triton
    3.6 and 3.8) does so where it must reuse the registers of an operand or accumulator in flight,
    and says "wgmma.mma_async instructions are serialized" in its log. None without HGMMAs."""
    loops = [(int(target.group(1), 16), address) for address, opcode, operands in sass
             if opcode.startswith("BRA") and (target := re.search(r"0x([0-9a-f]+)", operands))
             and int(target.group(1), 16) < address]
    if not loops:
        return None
    first, last = max(loops, key=lambda loop: loop[1] - loop[0])
    body = [(opcode, operands) for address, opcode, operands in sass if first <= address <= last]
    mmas = sum(opcode.startswith("HGMMA") for opcode, _ in body)
    waits = sum(opcode == "WARPGROUP.DEPBAR.LE" and operands.strip().endswith("0x0") for opcode, operands in body)
    return None if not mmas else waits >= mmas


def problems(name, dtype, arch, default, regs, stack, shared, unit, async_copies, copy_sizes):
    """Why a compiled config fails the check (empty: it passes)."""
    found = []
    if shared > SHARED_MEMORY[arch]:
        found.append(f"needs {shared} B of shared memory, sm_{arch} has {SHARED_MEMORY[arch]}")
    if default and dtype != "fp64" and stack > SPILL_LIMIT:
        found.append(f"default config spills {stack} B per thread, more than the {SPILL_LIMIT} any default may")
    if default and name.startswith(MATMUL_KERNELS):
        # The plain head's defaults must not spill: in 16-bit and TF32 on sm_90, and in 3xTF32
        # too on sm_8x (their "/sm8x" configs; 3xTF32 spills a few dozen bytes on sm_90).
        spill_free = ("bf16", "fp16", "tf32") + (("fp32",) if arch // 10 == 8 else ())
        if arch in (80, 86, 89, 90) and dtype in spill_free and stack and "sym=False" in name:
            found.append(f"default config spills {stack} B per thread")
        if arch == 90 and dtype in ("bf16", "fp16", "tf32") and unit != "wgmma":
            found.append(f"dots compiled to {unit}, not wgmma")
        if arch == 90 and dtype != "fp64" and copy_sizes and 16 not in copy_sizes:
            # The big tiles a kernel pipelines are its dots' memory operands; with no 16-byte copy
            # at all, Triton is transposing them on the way in (see head_backward.py, K_MAJOR).
            found.append("no 16-byte cp.async: a dot operand is not in the layout its dot reads")
        if async_copies == 0:
            found.append("no pipelined (cp.async) load")
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["bf16", "tf32", "fp32", "fp16", "fp64"])
    parser.add_argument("--archs", nargs="+", type=int, choices=sorted(SHARED_MEMORY), default=[90],
                        help="compute capabilities, e.g. 80 86 90")
    parser.add_argument("--emb", type=int, default=768)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--classes", type=int, default=97)
    parser.add_argument("--all-configs", action="store_true", help="every candidate config, not just the default")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the compiler")
    failures = 0
    print(f"triton {triton.__version__}  E={args.emb} B={args.block} C={args.classes}  (fp32 = 3xTF32, tf32 = TF32)")
    for arch in args.archs:
        target = GPUTarget("cuda", arch, 32)
        for dtype in args.dtypes:
            for name, kernel, pointers, constexprs, configs in variants(dtype, args.emb, args.block, args.classes,
                                                                        args.all_configs, arch):
                for tiles, default in configs:
                    if tiles is None:
                        constants, warps, stages, label_tiles = constexprs, 4, 1, "-"
                    else:
                        constants = dict(constexprs, BLOCK_N=tiles.block_n, ROWS=rows_per_step(args.block, tiles.rows))
                        warps, stages = tiles.num_warps, tiles.num_stages
                        label_tiles = f"n{tiles.block_n} r{tiles.rows} w{warps} s{stages}"
                    label = f"sm_{arch} {dtype:4s} {name:32s} {label_tiles:16s}{'*' if default else ' '}"
                    start = time.time()
                    try:
                        compiled = compile_variant(kernel, pointers, constants, warps, stages, target)
                    except Exception as exc:  # report every failure, then exit non-zero
                        failures += 1
                        print(f"FAIL {label}: {type(exc).__name__}: {exc}"[:3000], flush=True)
                        continue
                    ptx = compiled.asm["ptx"]
                    unit = ("tcgen05" if "tcgen05.mma" in ptx else "wgmma" if "wgmma" in ptx
                            else "mma" if "mma.sync" in ptx else "fma")
                    async_copies = len(re.findall(r"cp\.async\.(?:ca|cg|bulk)", ptx))
                    copy_sizes = collections.Counter(int(size, 16) for size in re.findall(
                        r"cp\.async\.c[ag]\.shared\.global[^;]*?,\s*0x([0-9a-f]+)\s*[,;]", ptx))
                    regs, stack = resource_usage(compiled.asm["cubin"])
                    shared = compiled.metadata.shared
                    serial = {None: "", True: " serial", False: " async"}[wgmma_serialized(sass_of(compiled.asm["cubin"]))]
                    found = problems(name, dtype, arch, default, regs, stack, shared, unit, async_copies, copy_sizes)
                    failures += bool(found)
                    print(f"{'FAIL' if found else 'ok  '} {label} regs={regs:3d} stack={stack:4d} "
                          f"smem={shared // 1024:3d}K {unit + serial:13s} cp.async={async_copies:3d} "
                          f"({' '.join(f'{n}x{size}B' for size, n in sorted(copy_sizes.items(), reverse=True)):18s}) "
                          f"{time.time() - start:4.1f}s {'; '.join(found)}", flush=True)
    print(f"{failures} failed  (* = default config)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
