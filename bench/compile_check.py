"""Compile every Triton kernel variant for real GPU targets (sm_80, sm_90a) without a GPU, and
report registers and spills from ptxas. Run without TRITON_INTERPRET."""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

assert os.environ.get("TRITON_INTERPRET", "0") != "1", "run without TRITON_INTERPRET"

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from ncrl_kernels.triton_kernels import head_backward, head_forward, loss_rows  # noqa: E402
from ncrl_kernels.triton_kernels._common import padded  # noqa: E402

PTR = {"fp32": "*fp32", "bf16": "*bf16", "fp16": "*fp16", "fp64": "*fp64"}


def compile_one(kernel, pointers, constexprs, config, target):
    fn = kernel.fn  # the JITFunction under the autotuner
    signature = {}
    consts = dict(constexprs, **config.kwargs)
    for name in fn.arg_names:
        if name in consts:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name] if pointers[name] is not None else "constexpr"
            if pointers[name] is None:
                consts[name] = None
        else:
            signature[name] = "i32"
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=consts)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=target, options=options)


def resource_usage(cubin):
    """(registers, stack bytes) per thread from cuobjdump; stack > 0 means register spills."""
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(cubin)
    out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    os.unlink(f.name)
    found = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(found.group(1)), int(found.group(2))) if found else (-1, -1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtypes", nargs="+", default=["fp32", "bf16", "fp16", "fp64"])
    ap.add_argument("--archs", nargs="+", type=int, default=[90])
    ap.add_argument("--emb", type=int, default=768)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--classes", type=int, default=97)
    ap.add_argument("--all-configs", action="store_true")
    args = ap.parse_args()
    E, B, C = args.emb, args.block, args.classes
    shape = dict(E=E, B=B, C=C, BLOCK_J=padded(B), BLOCK_C=padded(C))
    failures = 0
    for arch in args.archs:
        target = GPUTarget("cuda", arch, 32)
        arch_name = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
        for dt in args.dtypes:
            p = PTR[dt]
            loss_ptr = "*fp64" if dt == "fp64" else "*fp32"
            cases = []
            for sym in (False, True):
                common = dict(shape, SYMMETRIC=sym, ALLOW_TF32=dt == "fp32", COMPUTE_FP64=dt == "fp64")
                fwd = dict(common, HAS_BIAS=True, LOSS=1, GAMMA=0.05, MARGIN_REG=True, MEAN=True)
                cases.append((f"forward ncrl sym={sym}", head_forward.head_forward_kernel,
                              dict(hs=p, ts=p, weight=p, bias=p, labels=loss_ptr, logits=p, dlogits=loss_ptr,
                                   row_loss=loss_ptr), fwd))
                cases.append((f"weight_grad sym={sym}", head_backward.weight_grad_kernel,
                              dict(grad=loss_ptr, hs=p, ts=p, dweight=p, dbias=loss_ptr),
                              dict(common, BLOCK_N=head_backward.WEIGHT_GRAD_BLOCK_N)))
                cases.append((f"input_grad sym={sym}", head_backward.input_grad_kernel,
                              dict(grad=loss_ptr, hs=p, ts=p, weight=p, dhs=p, dts=p), common))
            head_only = dict(shape, SYMMETRIC=False, ALLOW_TF32=False, COMPUTE_FP64=dt == "fp64", HAS_BIAS=False,
                             LOSS=0, GAMMA=0.0, MARGIN_REG=False, MEAN=False)
            cases.append(("forward head-only", head_forward.head_forward_kernel,
                          dict(hs=p, ts=p, weight=p, bias=None, labels=None, logits=p, dlogits=None, row_loss=None),
                          head_only))
            if dt in ("fp32", "fp64"):
                for code, name in ((1, "ncrl"), (2, "atl"), (3, "bce")):
                    cases.append((f"loss {name}", loss_rows.loss_kernel,
                                  dict(logits=loss_ptr, labels=loss_ptr, dlogits=loss_ptr, row_loss=loss_ptr),
                                  dict(C=C, LOSS=code, GAMMA=0.05 if code == 1 else 0.0, MARGIN_REG=True,
                                       MEAN=True, BLOCK_C=padded(C))))
            for name, kernel, pointers, consts in cases:
                configs = kernel.configs if args.all_configs else kernel.configs[:1]
                for cfg in configs:
                    t = time.time()
                    try:
                        compiled = compile_one(kernel, pointers, consts, cfg, target)
                    except Exception as exc:  # report and go on
                        failures += 1
                        print(f"FAIL {arch_name} {dt:5s} {name:28s} {cfg}: {type(exc).__name__}: {exc}"[:2000])
                        continue
                    regs, stack = resource_usage(compiled.asm["cubin"])
                    mma = "wgmma" if "wgmma" in compiled.asm["ptx"] else ("mma.sync" if "mma.sync" in compiled.asm["ptx"] else "fma")
                    print(f"ok   {arch_name} {dt:5s} {name:28s} {str(cfg.kwargs):18s} w{cfg.num_warps} s{cfg.num_stages} "
                          f"regs={regs:3d} stack={stack:5d} {mma:8s} {time.time() - t:.1f}s", flush=True)
    print(f"{failures} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
