#!/usr/bin/env python
"""Per-kernel benchmark of the Triton backend at DocRED shape (E=768, B=64, C=97): every
candidate config of the forward, epilogue, weight-gradient and input-gradient kernels, timed
alone, next to the roofline figure of bench/roofline.py, and checked against the default
config's output. Then the default configs through the public API against the fp64 reference,
with eager's error beside it (3xTF32 must stay within 2x of eager fp32's, docs/spec.md).

    python bench/kernels.py                          # CUDA: N=4096, bf16 tf32 tf32x3, plain + symmetric
    TRITON_INTERPRET=1 python bench/kernels.py --n 64 --emb 32 --block 8   # smoke test on a CPU

Rows go to bench/results/<device>-kernels.csv. This is how the default configs in
triton_kernels/ (FORWARD_TILES, WEIGHT_GRAD_TILES, INPUT_GRAD_TILES) are chosen.
"""
import argparse
import dataclasses
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import roofline  # noqa: E402

import ncrl_kernels  # noqa: E402
from ncrl_kernels.triton_kernels import head_backward, head_forward, loss_rows  # noqa: E402
from ncrl_kernels.triton_kernels._common import LOSS_CODES, TRITON_INTERPRET, Tiles, candidate_tiles  # noqa: E402
from ncrl_kernels.triton_kernels._launch import direct_launches  # noqa: E402

# Benchmark dtypes: the head's dtype (the weight's, the dots' operands'), the fp32 matmul precision
# the kernels get, and hs's and ts's dtype. "bf16-amp": a bf16 head with fp32 hs and ts, which the
# kernels round as they load them, as under autocast from fp32 activations (bench/run.py's step);
# "bf16": bf16 hs and ts, as ATLOP's autocast linears give them.
KINDS = {"bf16": (torch.bfloat16, "ieee", torch.bfloat16), "bf16-amp": (torch.bfloat16, "ieee", torch.float32),
         "tf32": (torch.float32, "tf32", torch.float32), "tf32x3": (torch.float32, "tf32x3", torch.float32)}
COLUMNS = ["kernel", "kind", "symmetric", "n_pairs", "emb", "block", "classes", "tiles", "split", "ms", "model_ms",
           "tflops", "max_rel_diff", "device", "commit", "timestamp"]


def time_ms(fn, device, reps):
    """Median time of one call, from `reps` calls between two synchronisations, over 5 rounds.
    Launches go straight to Triton, as in the backend (``direct_launches``), not through
    wrap_triton's higher-order op, whose Python would be timed instead of short kernels."""
    with direct_launches():
        return _time_ms(fn, device, reps)


def _time_ms(fn, device, reps):
    fn()
    harness.synchronize(device)
    rounds = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        harness.synchronize(device)
        rounds.append((time.perf_counter() - t0) * 1e3 / reps)
    return sorted(rounds)[2]


def rel_diff(got, want):
    scale = want.abs().max().item() or 1.0
    return (got.double() - want.double()).abs().max().item() / scale


@dataclasses.dataclass
class Inputs:
    hs: torch.Tensor
    ts: torch.Tensor
    weight: torch.Tensor
    labels: torch.Tensor
    grad_logits: torch.Tensor  # d loss / d logits [N, C]


def make_inputs(n, emb, block, classes, dtype, device, seed=0, inputs_dtype=None):
    """Inputs in `dtype`, hs and ts in `inputs_dtype` (default: `dtype`)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.rand(n, emb, generator=g) * 2 - 1
    ts = torch.rand(n, emb, generator=g) * 2 - 1
    weight = (torch.rand(classes, emb * block, generator=g) * 2 - 1) / math.sqrt(emb * block)
    labels = torch.zeros(n, classes)
    labels[:, 0] = 1.0
    grad_logits = torch.randn(n, classes, generator=g) / n
    to = lambda x, dt=dtype: x.to(device=device, dtype=dt)  # noqa: E731
    inputs_dtype = inputs_dtype or dtype
    return Inputs(to(hs, inputs_dtype), to(ts, inputs_dtype), to(weight), labels.to(device), grad_logits.to(device))


def tiles_name(tiles):
    return f"n{tiles.block_n}-r{tiles.rows}-w{tiles.num_warps}-s{tiles.num_stages}"


def kernel_rows(args, device, kind, symmetric, emit):
    """Time every candidate of every kernel for one (kind, symmetric) at N = args.n."""
    dtype, precision, inputs_dtype = KINDS[kind]
    n, emb, block, classes = args.n, args.emb, args.block, args.classes
    x = make_inputs(n, emb, block, classes, dtype, device, inputs_dtype=inputs_dtype)
    common = dict(block_size=block, symmetric=symmetric, precision=precision)
    default_forward = candidate_tiles(head_forward.FORWARD_TILES, dtype, precision, x.hs.device)[0]
    model = roofline.kernel_model(n, emb, block, classes, kind.removesuffix("-amp"),
                                  split=head_forward.split_count(default_forward, n, emb, block, device),
                                  inputs_elt=x.hs.element_size())

    firsts = {}  # kernel -> the first (default) candidate's output, which the others must match
    # A short kernel's row times its launch too: "-jit" where launches take JITFunction.run.
    launch_suffix = harness.triton_launch_suffix() if device.type == "cuda" else ""

    def measure(name, tiles, fn, split="", compare=lambda out: out):
        try:
            with direct_launches():
                out = fn()
            ms = time_ms(fn, device, args.reps)
        except Exception as exc:  # a config that fails to compile or launch is reported, not fatal
            print(f"  {name:12s} {kind:6s} sym={int(symmetric)} {tiles_name(tiles):16s} FAILED "
                  f"{type(exc).__name__}: {str(exc)[:300]}", flush=True)
            return None
        value = compare(out).clone()
        diff = rel_diff(value, firsts.setdefault(name, value))
        emit(dict(kernel=name, kind=kind + launch_suffix, symmetric=int(symmetric), n_pairs=n, emb=emb, block=block, classes=classes,
                  tiles=tiles_name(tiles), split=split, ms=round(ms, 4), model_ms=round(model[name], 4),
                  tflops=round(model["flop"] / ms / 1e9, 1) if name != "epilogue" else "",
                  max_rel_diff=f"{diff:.1e}"))
        return out

    partial = None
    for tiles in candidate_tiles(head_forward.FORWARD_TILES, dtype, precision, x.hs.device):
        auto = head_forward.split_count(tiles, n, emb, block, device)
        for split in sorted({(auto + 1) // 2, auto} if not TRITON_INTERPRET else {auto}):
            out = measure("forward", tiles, lambda t=dataclasses.replace(tiles, split=split):
                          head_forward.launch_head_forward(x.hs, x.ts, x.weight, tiles=t, **common),
                          split=str(split), compare=lambda p: p.sum(0))
            partial = out if partial is None else partial
    if partial is None:
        return
    logits = torch.empty(n, classes, device=device, dtype=dtype)
    # As the fused op writes it: the backward's padded grad operand (for the mean loss).
    dlogits = head_backward.empty_grad_operand(x.hs, classes, dtype, "mean")
    row_loss = torch.empty(n, device=device)
    measure("epilogue", Tiles(loss_rows.EPILOGUE_ROWS, 1, 4, 1),
            lambda: loss_rows.launch_epilogue(partial, None, logits, labels=x.labels, dlogits=dlogits,
                                              row_loss=row_loss, loss=LOSS_CODES["ncrl"], gamma=0.05,
                                              margin_reg=True, mean=True) or dlogits,
            split=str(partial.shape[0]))
    # The kernels alone: their operands (padded, and transposed for fp32) are prepared once, outside the timing;
    # their results scaled by an incoming gradient, as a fused op's backward runs them (but fp16's).
    grad = head_backward.padded_grad(x.grad_logits, dtype)
    scale = torch.ones((), device=device) if head_backward.grad_operand_dtype(dtype, "mean") == dtype else None
    weight_grad_operands = head_backward.weight_grad_operands(grad, x.hs, x.ts)
    for tiles in candidate_tiles(head_backward.WEIGHT_GRAD_TILES, dtype, precision, x.hs.device):
        # In fp32 for 16-bit operands too, as under autocast with an fp32 weight (ATLOP's case).
        dweight = torch.empty_like(x.weight, dtype=torch.promote_types(x.weight.dtype, torch.float32))
        dbias = torch.empty(classes, device=device, dtype=dweight.dtype)
        measure("weight_grad", tiles, lambda t=tiles, d=dweight, b=dbias: head_backward.launch_weight_grad(
            weight_grad_operands, d, grad, b, n=n, scale=scale, tiles=t, **common) or d)
    weight = head_backward.input_grad_operand(x.weight)
    for tiles in candidate_tiles(head_backward.INPUT_GRAD_TILES, dtype, precision, x.hs.device):
        dhs, dts = torch.empty_like(x.hs), torch.empty_like(x.ts)
        measure("input_grad", tiles, lambda t=tiles, a=dhs, b=dts: head_backward.launch_input_grad(
            grad, weight, x.hs, x.ts, a, b, classes=classes, scale=scale, tiles=t, **common) or torch.cat([a, b], 1))


def accuracy(args, device, kind, symmetric):
    """Default configs through fused_ncrl + backward against the fp64 reference, with the same
    comparison for eager (the reference backend in the same dtype and precision; "-amp" kinds
    under autocast from fp32 leaves)."""
    dtype, precision, inputs_dtype = KINDS[kind]
    amp = inputs_dtype != dtype
    n = min(args.n, args.accuracy_n)
    x = make_inputs(n, args.emb, args.block, args.classes, torch.float64, device, seed=1)
    labels = torch.zeros(n, args.classes, device=device)
    labels[torch.arange(n), torch.randint(0, args.classes, (n,))] = 1.0
    bias = torch.zeros(args.classes, device=device, dtype=torch.float64)
    kw = dict(block_size=args.block, symmetric=symmetric, gamma=0.05, return_logits=True)

    def run(backend, dt):
        leaves = [t.detach().to(dt if dt == torch.float64 or not amp else torch.float32).requires_grad_()
                  for t in (x.hs, x.ts, x.weight, bias)]
        with torch.autocast(device.type, dtype=dt, enabled=amp and dt != torch.float64):
            loss, logits = ncrl_kernels.fused_ncrl(*leaves, labels, backend=backend, **kw)
        loss.backward()
        return [loss.detach(), logits.detach()] + [t.grad for t in leaves]

    old = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if precision == "tf32" else "ieee"
    try:
        want = run("reference", torch.float64)
        got = run("triton", dtype)
        eager = run("reference", dtype)
    finally:
        torch.backends.cuda.matmul.fp32_precision = old
    names = ("loss", "logits", "d hs", "d ts", "d weight", "d bias")
    parts = [f"{name} {rel_diff(a, w):.1e} (eager {rel_diff(e, w):.1e})" for name, a, e, w in zip(names, got, eager, want)]
    print(f"  accuracy {kind:6s} sym={int(symmetric)} N={n}: max|triton - fp64| / max|fp64|: " + ", ".join(parts),
          flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu" if TRITON_INTERPRET else "cuda")
    p.add_argument("--n", type=int, default=4096)
    p.add_argument("--accuracy-n", type=int, default=1024)
    p.add_argument("--kinds", nargs="+", choices=sorted(KINDS), default=["bf16", "tf32", "tf32x3"])
    p.add_argument("--symmetric", nargs="+", type=int, choices=(0, 1), default=[0, 1])
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--classes", type=int, default=97)
    p.add_argument("--results", default=harness.RESULTS_DIR)
    args = p.parse_args(argv)
    if TRITON_INTERPRET:
        # The interpreter has no bf16: fp16 in its place (its tl.dot takes fp16).
        KINDS.update({k: tuple(torch.float16 if x == torch.bfloat16 else x for x in v) for k, v in KINDS.items()})
    device = torch.device(args.device)
    name = harness.device_name(device)
    commit, stamp = harness.git_commit(), harness.timestamp()
    print(f"device {name}  commit {commit}  torch {torch.__version__}  N={args.n} E={args.emb} B={args.block} "
          f"C={args.classes}\n  {'kernel':12s} {'kind':6s} {'sym':5s} {'tiles':16s} {'split':>5s} {'ms':>8s} "
          f"{'model':>8s} {'TFLOP/s':>8s}", flush=True)

    def emit(row):
        row.update(device=name, commit=commit, timestamp=stamp)
        harness.append_rows([row], device, args.results, suffix="-kernels", columns=COLUMNS)
        print(f"  {row['kernel']:12s} {row['kind']:6s} sym={row['symmetric']} {row['tiles']:16s} "
              f"{row['split']:>5s} {row['ms']:8.3f} {row['model_ms']:8.3f} {str(row['tflops']):>8s} "
              f"diff {row['max_rel_diff']}", flush=True)

    for kind in args.kinds:
        for symmetric in args.symmetric:
            kernel_rows(args, device, kind, bool(symmetric), emit)
    for kind in args.kinds:
        for symmetric in args.symmetric:
            accuracy(args, device, kind, bool(symmetric))
    print(f"rows appended to {os.path.join(args.results, name + '-kernels.csv')}")


if __name__ == "__main__":
    main()
