#!/usr/bin/env python
"""How much faster is a training step? ATLOP's whole model (`ncrl_kernels.atlop.DocREModel`) with
a BERT-base-sized encoder (random weights: nothing is downloaded), forward + backward of one
batch, with the fused head + NCRL against the unfused reference head (ATLOP's code path, which
builds the [pairs, E*B] feature), and with a free head (the encoder and extractors alone), which
gives the head's share of the step. The three take turns, round after round
(`harness.interleaved`): a step here is mostly the encoder and host work, whose time varies from
step to step by more than the head takes (on the H200 at fe98866 a provider's 20th-80th
percentile spanned 22-57 ms), so the head's time is taken pair by pair, the step's minus the free
head's step of the same round (rows of mode "head"; this cancels slow drift, not the step-to-step
jitter, which only more rounds average out), and the speed-up is the median of the rounds' ratios.

Batches: "docred" = 4 documents of 512 tokens with 20 entities each (380 ordered pairs per
document, DocRED's average), and "pairs" = 4 documents with 32 entities each (3968 pairs), the
pair-heavy end of DocRED batches.

    python bench/atlop_step.py                       # CUDA if available (bf16 autocast), else CPU (fp32)
    python bench/atlop_step.py --layers 2 --steps 2  # a smaller encoder: the head's share grows

Rows go to bench/results/<device>-atlop-step.csv (bench/run.py's columns; kernel = the batch,
provider = fused-<backend> / eager / encoder-only, n_pairs = the batch's pairs; mode = "step": the
whole step's time, or "head": the paired differences to encoder-only's step, and the difference of
the peak memory).
"""
import argparse
import contextlib
import functools
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

import ncrl_kernels  # noqa: E402
from ncrl_kernels.atlop import DocREModel  # noqa: E402

BATCHES = {"docred": (4, 20), "pairs": (4, 32)}  # documents, entities per document
TOKENS = 512
CLASSES = 97
# --tiny: a small encoder and batches, for a smoke test of the script (not a measurement).
TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, vocab_size=32000)
TINY_BATCHES = {"docred": (2, 4), "pairs": (2, 6)}
TINY_LAYERS = 2
POSITIVE_PAIR_RATE = 0.03


def make_model(args, device, backend, free_head=False):
    import transformers

    torch.manual_seed(0)
    config = transformers.BertConfig(num_hidden_layers=args.layers, num_labels=CLASSES,
                                     attn_implementation="eager", **(TINY if args.tiny else {}))
    config.transformer_type = "bert"
    config.cls_token_id, config.sep_token_id = 101, 102
    model = DocREModel(config, transformers.BertModel(config), 768, 64, num_labels=4, backend=backend)
    if free_head:
        model.bilinear = FreeHead()
    return model.to(device)


def make_batch(documents, entities, device, tokens=TOKENS, seed=0):
    """Token ids, mask, and per document: entity mentions (1-3 "*" positions each), all ordered
    pairs, and their multi-hot labels (3% of pairs hold one relation, the rest "Na")."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(1000, 30000, (documents, tokens), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    entity_pos, hts, labels = [], [], []
    for _ in range(documents):
        entity_pos.append([[(int(s), int(s) + 1) for s in torch.randint(1, tokens - 3, (int(k),), generator=g)]
                           for k in torch.randint(1, 4, (entities,), generator=g)])
        pairs = [[h, t] for h in range(entities) for t in range(entities) if h != t]
        rows = torch.zeros(len(pairs), CLASSES)
        positive = torch.rand(len(pairs), generator=g) < POSITIVE_PAIR_RATE
        rows[positive, torch.randint(1, CLASSES, (len(pairs),), generator=g)[positive]] = 1.0
        rows[:, 0] = (~positive).float()
        hts.append(pairs)
        labels.append(rows.tolist())
    return dict(input_ids=input_ids.to(device), attention_mask=torch.ones_like(input_ids).to(device),
                entity_pos=entity_pos, hts=hts, labels=labels)


class FreeHead(torch.nn.Module):
    """Stands in for the head + loss: a zero loss that still backpropagates into hs and ts."""

    num_classes = CLASSES
    loss = "ncrl"

    def forward(self, hs, ts, labels, return_logits=False):
        return (hs.sum() + ts.sum()) * 0.0, hs.new_zeros(hs.shape[0], CLASSES)


def step_fn(model, batch, autocast_dtype, device):
    autocast = (lambda: torch.autocast(device.type, dtype=autocast_dtype)) if autocast_dtype else contextlib.nullcontext

    def step(_):
        model.zero_grad(set_to_none=True)
        with autocast():
            loss, _ = model(**batch)
        loss.backward()

    return step


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batches", nargs="+", choices=sorted(BATCHES), default=["docred", "pairs"])
    p.add_argument("--layers", type=int, help=f"encoder layers (default: 12, BERT-base; --tiny: {TINY_LAYERS})")
    p.add_argument("--steps", type=int, default=5, help="rounds of timed steps (at least; each provider steps once "
                   "per round)")
    p.add_argument("--seconds", type=float, default=5.0, help="more rounds (up to 100) while a batch's rounds "
                   "took under this time")
    p.add_argument("--results", help=f"directory of the CSV (default: {harness.RESULTS_DIR}; --tiny: none, rows are "
                                     "only printed unless this is given)")
    p.add_argument("--tiny", action="store_true", help="a small encoder and batch: a smoke test, not a measurement")
    args = p.parse_args(argv)
    if args.layers is None:
        args.layers = TINY_LAYERS if args.tiny else 12
    device = torch.device(args.device)
    autocast_dtype = torch.bfloat16 if device.type == "cuda" else None
    fused = next(b for b in ("triton", "cpp", "cuda") if b in ncrl_kernels.available_backends(device)
                 and not (b == "triton" and device.type == "cpu"))
    providers = {f"fused-{fused}": fused, "eager": "reference", "encoder-only": "reference"}
    name, commit, stamp = harness.device_name(device), harness.git_commit(), harness.timestamp()
    dtype_name = "bf16" if autocast_dtype else "fp32"
    encoder = "tiny" if args.tiny else "BERT-base-sized"
    print(f"device {name}  commit {commit}  {encoder} encoder, {args.layers} layers, {dtype_name}")
    rows = []

    def row(batch_name, n_pairs, provider, mode, spread, peak):
        p50, p20, p80 = spread
        return dict(kernel=f"atlop_step_{batch_name}", provider=provider, mode=mode, dtype=dtype_name, n_pairs=n_pairs,
                    emb=768, block=64, classes=CLASSES, ms_p50=round(p50, 2), ms_p20=round(p20, 2),
                    ms_p80=round(p80, 2), peak_mem_mib=round(peak, 1), device=name, commit=commit, timestamp=stamp)

    for batch_name in args.batches:
        documents, entities = (TINY_BATCHES if args.tiny else BATCHES)[batch_name]
        batch = make_batch(documents, entities, device, tokens=64 if args.tiny else TOKENS)
        n_pairs = sum(len(h) for h in batch["hts"])
        steps = {provider: step_fn(make_model(args, device, backend, free_head=provider == "encoder-only"), batch,
                                   autocast_dtype, device)
                 for provider, backend in providers.items()}
        times = harness.interleaved({p: functools.partial(harness.wall_ms, step, device) for p, step in steps.items()},
                                    min_rounds=args.steps, budget_s=args.seconds)
        peaks = {p: harness.peak_extra_mib(step, device) if device.type == "cuda" else float("nan")
                 for p, step in steps.items()}
        del steps
        for provider in providers:
            p50, p20, p80 = harness.spread(times[provider])
            rows.append(row(batch_name, n_pairs, provider, "step", (p50, p20, p80), peaks[provider]))
            memory = f"  peak extra {peaks[provider]:7.0f} MiB" if device.type == "cuda" else ""
            print(f"  {batch_name:7s} {n_pairs:5d} pairs  {provider:14s} {p50:9.1f} ms (rounds' 20th-80th percentile "
                  f"{p20:.1f}-{p80:.1f}){memory}", flush=True)
        # Paired within each round: the head's time is a step's minus the free head's step of the same round.
        rounds = len(times["eager"])
        for provider in (f"fused-{fused}", "eager"):
            head = harness.spread([a - b for a, b in zip(times[provider], times["encoder-only"])])
            rows.append(row(batch_name, n_pairs, provider, "head", head, peaks[provider] - peaks["encoder-only"]))
            share = 100 * head[0] / statistics.median(times[provider])
            print(f"  {batch_name:7s} {provider:14s} head + loss {head[0]:8.1f} ms (rounds' 20th-80th percentile "
                  f"{head[1]:.1f}-{head[2]:.1f}) = {share:4.1f}% of the step")
        faster = sum(a > b for a, b in zip(times["eager"], times[f"fused-{fused}"]))
        ratio = statistics.median(a / b for a, b in zip(times["eager"], times[f"fused-{fused}"]))
        print(f"  {batch_name:7s} step: fused {ratio:.2f}x faster than eager (median of the rounds' ratios), "
              f"faster in {faster} of {rounds} rounds")
    if args.results is None and args.tiny:
        print("not written: --tiny is a smoke test (pass --results DIR to keep its rows)")
        return rows
    path = harness.append_rows(rows, device, args.results or harness.RESULTS_DIR, suffix="-atlop-step")
    print(f"appended {len(rows)} rows to {path}")
    return rows


if __name__ == "__main__":
    main()
