"""Quality study: are NCRL and its margin shift robust to false-negative labels?

The NCRL paper (sec. 3.4) proposes the margin shift gamma against mislabelled samples, false
negatives above all (a relation the annotators missed is labelled "no relation"). This script
measures it on a synthetic multi-label task with the same small model trained with each loss:

- Task: entity pairs (head u, tail v in R^d). Every entity belongs to one of ``--clusters`` latent
  types (a Gaussian prototype plus noise of scale ``--spread``, so types overlap a little); each
  relation holds for a random ``--rate`` of the (head type, tail type) combinations. Most pairs
  have no relation ("Na"), some have several, and the relations are a function of the vectors
  that the model can learn.
- Noise: in the training and dev labels, each positive label is turned into "none" with
  probability 0, 0.2 and 0.4 (the dev split comes from the same annotation, so it is noisy too);
  the test labels are clean.
- Model: ATLOP's head on the pair: ``hs = tanh(W_h [u; v])``, ``ts = tanh(W_t [v; u])``, then the
  group-bilinear classifier and the loss in one ``ncrl_kernels.fused_ncrl`` call.
- Losses: NCRL with gamma 0 and 0.05, ATL (both predict ``f_k > f_0``), BCE (a global threshold
  from {0.1, ..., 0.9} tuned on dev, as the paper does).
- Protocol (the paper's): Adam, the epoch with the best dev F1 is kept; micro F1 over relation
  labels on the clean test split; mean and standard deviation over seeds.

Writes ``quality.csv`` (one row per run), ``quality.md`` (the table) and ``quality.png`` (F1
against the false-negative rate) to ``--out`` (default bench/results/). Needs matplotlib for the
plot (``pip install matplotlib``, or the ``bench`` extra).

    python bench/quality.py                 # 3 seeds, a few minutes on 2 CPU cores
"""
import argparse
import csv
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

import ncrl_kernels

NOISE_RATES = (0.0, 0.2, 0.4)
# name -> (fused_ncrl loss, gamma)
LOSSES = {
    "NCRL (gamma=0)": ("ncrl", 0.0),
    "NCRL (gamma=0.05)": ("ncrl", 0.05),
    "ATL": ("atl", 0.0),
    "BCE": ("bce", 0.0),
}
BCE_THRESHOLDS = [t / 10 for t in range(1, 10)]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-pairs", type=int, default=20000, help="dev has a quarter, test half as many")
    parser.add_argument("--dim", type=int, default=16, help="entity vector size d")
    parser.add_argument("--clusters", type=int, default=16, help="latent entity types")
    parser.add_argument("--spread", type=float, default=0.6, help="noise around each type's prototype")
    parser.add_argument("--relations", type=int, default=8)
    parser.add_argument("--rate", type=float, default=0.03, help="fraction of type pairs holding each relation")
    parser.add_argument("--emb-size", type=int, default=64)
    parser.add_argument("--block-size", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: small ops, and spinning threads collapse on shared cores)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    return parser.parse_args(argv)


def make_task(args, seed):
    """Clean (u, v, labels) for train, dev and test; labels [n, 1 + relations], column 0 = Na."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(args.clusters, args.dim, generator=g)
    relations_of_types = (torch.rand(args.clusters, args.clusters, args.relations, generator=g) < args.rate).float()
    sizes = {"train": args.train_pairs, "dev": args.train_pairs // 4, "test": args.train_pairs // 2}
    splits = {}
    for name, n in sizes.items():
        head_type = torch.randint(args.clusters, (n,), generator=g)
        tail_type = torch.randint(args.clusters, (n,), generator=g)
        u = prototypes[head_type] + args.spread * torch.randn(n, args.dim, generator=g)
        v = prototypes[tail_type] + args.spread * torch.randn(n, args.dim, generator=g)
        splits[name] = (u, v, with_na(relations_of_types[head_type, tail_type]))
    return splits


def with_na(relations):
    return torch.cat([(relations.sum(1, keepdim=True) == 0).float(), relations], dim=1)


def add_false_negatives(labels, rate, generator):
    """Each positive relation label becomes "none" with probability ``rate``."""
    keep = torch.rand(labels[:, 1:].shape, generator=generator) >= rate
    return with_na(labels[:, 1:] * keep)


class PairClassifier(nn.Module):
    """ATLOP's extractors and group-bilinear head on a pair of entity vectors; with labels, the
    head and the loss run as one ``ncrl_kernels.fused_ncrl`` call (GroupBilinearLoss)."""

    def __init__(self, dim, emb_size, block_size, num_classes, loss, gamma):
        super().__init__()
        self.head_extractor = nn.Linear(2 * dim, emb_size)
        self.tail_extractor = nn.Linear(2 * dim, emb_size)
        self.bilinear = ncrl_kernels.GroupBilinearLoss(emb_size, block_size, num_classes, loss=loss, gamma=gamma)

    def forward(self, u, v, labels=None):
        hs = torch.tanh(self.head_extractor(torch.cat([u, v], 1)))
        ts = torch.tanh(self.tail_extractor(torch.cat([v, u], 1)))
        return self.bilinear(hs, ts, labels)


def micro_prf(pred, labels):
    """Micro precision, recall, F1 over the relation columns."""
    pred, gold = pred[:, 1:] > 0, labels[:, 1:] > 0
    tp = (pred & gold).sum().item()
    p = tp / max(pred.sum().item(), 1)
    r = tp / max(gold.sum().item(), 1)
    return p, r, 0.0 if p + r == 0 else 2 * p * r / (p + r)


def predictions(logits, loss, threshold):
    if loss == "bce":  # a global probability threshold; column 0 unused
        relations = (torch.sigmoid(logits[:, 1:]) > threshold).float()
        return with_na(relations)
    return ncrl_kernels.predict(logits)


def train_and_test(args, splits, noise, loss_name, seed):
    loss, gamma = LOSSES[loss_name]
    g = torch.Generator().manual_seed(seed + 1)
    (tu, tv, train_clean), (du, dv, dev_clean), (su, sv, test_labels) = (splits[s] for s in ("train", "dev", "test"))
    train_labels = add_false_negatives(train_clean, noise, g)
    dev_labels = add_false_negatives(dev_clean, noise, g)

    torch.manual_seed(seed)
    model = PairClassifier(args.dim, args.emb_size, args.block_size, train_labels.shape[1], loss, gamma)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    thresholds = BCE_THRESHOLDS if loss == "bce" else [None]
    best = (-1.0, None)
    for epoch in range(args.epochs):
        order = torch.randperm(len(tu), generator=g)
        for start in range(0, len(order), args.batch_size):
            batch = order[start:start + args.batch_size]
            optimizer.zero_grad()
            model(tu[batch], tv[batch], train_labels[batch]).backward()
            optimizer.step()
        with torch.no_grad():
            dev_logits, test_logits = model(du, dv), model(su, sv)
        for threshold in thresholds:
            dev_f1 = micro_prf(predictions(dev_logits, loss, threshold), dev_labels)[2]
            if dev_f1 > best[0]:
                test = micro_prf(predictions(test_logits, loss, threshold), test_labels)
                best = (dev_f1, {"epoch": epoch + 1, "threshold": threshold, "dev_f1": dev_f1, "test_precision": test[0],
                                 "test_recall": test[1], "test_f1": test[2]})
    return best[1]


def write_results(rows, args):
    args.out.mkdir(parents=True, exist_ok=True)
    fields = ["noise", "loss", "seed", "test_f1", "test_precision", "test_recall", "dev_f1", "epoch", "threshold"]
    with open(args.out / "quality.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows({k: row[k] for k in fields} for row in rows)

    def f1s(loss_name, noise):
        return [100 * r["test_f1"] for r in rows if r["loss"] == loss_name and r["noise"] == noise]

    def cell(values):
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}" if len(values) > 1 else f"{values[0]:.1f}"

    header = "| loss | " + " | ".join(f"{int(100 * n)}% false negatives" for n in NOISE_RATES) + " |"
    lines = [header, "|---" * (len(NOISE_RATES) + 1) + "|"]
    lines += [f"| {name} | " + " | ".join(cell(f1s(name, n)) for n in NOISE_RATES) + " |" for name in LOSSES]
    table = "\n".join(lines)
    seeds = len({r["seed"] for r in rows})
    (args.out / "quality.md").write_text(
        f"Test micro F1 (%) on clean labels, mean ± std over {seeds} seed(s); training and dev labels with "
        f"the given rate of positive labels turned into \"none\". Reproduce: `python bench/quality.py`.\n\n"
        f"{table}\n")

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name in LOSSES:
        means = [statistics.mean(f1s(name, n)) for n in NOISE_RATES]
        errors = [statistics.stdev(f1s(name, n)) if seeds > 1 else 0.0 for n in NOISE_RATES]
        ax.errorbar([100 * n for n in NOISE_RATES], means, yerr=errors, marker="o", capsize=3, label=name)
    ax.set_xlabel("false-negative rate in training and dev labels (%)")
    ax.set_ylabel("test micro F1 (%)")
    ax.set_title("Robustness to false negatives (synthetic multi-label task)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "quality.png", dpi=120)
    return table


def require_matplotlib():
    """The plot is drawn last: a missing matplotlib must stop the run before minutes of training."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("bench/quality.py needs matplotlib to plot its results: pip install matplotlib "
                 "(or pip install --no-build-isolation -e \".[bench]\")")


def main(argv=None):
    args = parse_args(argv)
    require_matplotlib()
    torch.set_num_threads(args.threads)
    rows = []
    start = time.perf_counter()
    for seed in range(args.seeds):
        splits = make_task(args, seed)
        for noise in NOISE_RATES:
            for loss_name in LOSSES:
                result = train_and_test(args, splits, noise, loss_name, seed)
                rows.append({"noise": noise, "loss": loss_name, "seed": seed, **result})
                print(f"seed {seed}  noise {noise:.0%}  {loss_name:<18} test F1 {100 * result['test_f1']:.1f}  "
                      f"(best dev epoch {result['epoch']})  {time.perf_counter() - start:.0f}s", flush=True)
    print(write_results(rows, args))
    print(f"wrote {args.out / 'quality.csv'}, quality.md, quality.png")


if __name__ == "__main__":
    main()
