#!/usr/bin/env python
"""Roofline model of the Triton backend's kernels on an H200 (the GPU this project is lent):
each kernel's ideal time is the larger of its tensor-core time at peak and its HBM time, for
the work the kernels actually do (classes padded to the 128-wide tile, 3 dots for 3xTF32).

    python bench/roofline.py                 # N = 1024 4096 16384, bf16, TF32 and 3xTF32, DocRED shape

These are predictions, not measurements: real kernels reach some fraction of them (the
per-kernel benchmark, bench/kernels.py, prints its measured times next to these). L2 traffic,
latency and launch overhead are not modelled. The eager head moves the [N, E*B] feature through
HBM several times (built, cast, read by two GEMMs, its gradient written and read), which is why
fusing pays even though the FLOPs are the same.
"""
import argparse

from ncrl_kernels.triton_kernels import head_forward

# H200 SXM: dense tensor-core peaks as measured with a large PyTorch matmul on the lent machine
# (bf16 ~790 TFLOP/s; TF32 about half), HBM3e bandwidth (~4.3 TB/s device-to-device copy), SMs.
PEAK_TFLOPS = {"bf16": 790.0, "tf32": 395.0, "tf32x3": 395.0 / 3}
HBM_TBPS = 4.3
SMS = 132
CLASS_TILE = 128
# The forward's config table (head_forward.FORWARD_TILES) of each kind, Hopper's lists.
TABLE_KEY = {"bf16": "16bit", "tf32": "tf32", "tf32x3": "tf32x3"}


def kernel_model(n, emb, block, classes, kind, split=None, inputs_elt=4):
    """{kernel: ideal ms} for forward, epilogue, weight_grad, input_grad and their sum "step",
    plus "flop" (one GEMM-sized kernel's FLOPs with the padded class tile). `inputs_elt`: bytes
    per element of hs and ts (and their gradients), 4 as bench/run.py passes them (fp32; its bf16
    runs autocast from fp32 leaves, and the kernels round them as they load them)."""
    elt = 2 if kind == "bf16" else 4
    flop = 2.0 * n * emb * block * CLASS_TILE
    tensor_ms = flop / (PEAK_TFLOPS[kind] * 1e9)
    weight_bytes = classes * emb * block * elt
    inputs_bytes = 2 * n * emb * inputs_elt
    # The forward's split with its default config on the H200 (bench/kernels.py passes the real one).
    split = split or head_forward.split_for(head_forward.FORWARD_TILES[TABLE_KEY[kind]][0], n, emb, block, SMS)
    partial_bytes = split * n * classes * 4

    def hbm_ms(nbytes):
        return nbytes / (HBM_TBPS * 1e9)

    model = {
        "forward": max(tensor_ms, hbm_ms(inputs_bytes + weight_bytes + partial_bytes)),
        # partials in; labels, logits, d logits out
        "epilogue": hbm_ms(partial_bytes + n * classes * (4 + elt + 4)),
        # d weight written in fp32: bf16 runs under autocast with an fp32 weight, as ATLOP trains
        "weight_grad": max(tensor_ms, hbm_ms(inputs_bytes + n * CLASS_TILE * elt + classes * emb * block * 4)),
        "input_grad": max(tensor_ms, hbm_ms(2 * inputs_bytes + n * CLASS_TILE * elt + weight_bytes)),
        "flop": flop,
    }
    model["step"] = model["forward"] + model["epilogue"] + model["weight_grad"] + model["input_grad"]
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--kinds", nargs="+", choices=sorted(PEAK_TFLOPS), default=["bf16", "tf32", "tf32x3"])
    p.add_argument("--emb", type=int, default=768)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--classes", type=int, default=97)
    args = p.parse_args(argv)
    print("predicted ideal ms on an H200 (max of tensor-core time at peak and HBM time; not measured)")
    print(f"  {'kind':7s} {'N':>6s} {'forward':>8s} {'epilogue':>8s} {'dW':>8s} {'dX':>8s} {'fwd+bwd':>8s}")
    for kind in args.kinds:
        for n in args.n:
            m = kernel_model(n, args.emb, args.block, args.classes, kind)
            print(f"  {kind:7s} {n:6d} {m['forward']:8.3f} {m['epilogue']:8.3f} {m['weight_grad']:8.3f} "
                  f"{m['input_grad']:8.3f} {m['step']:8.3f}")


if __name__ == "__main__":
    main()
