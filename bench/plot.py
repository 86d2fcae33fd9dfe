#!/usr/bin/env python
"""Plots of the benchmark CSVs: time and peak extra memory against N, per mode and dtype.

    python bench/plot.py                      # every bench/run.py CSV in bench/results -> <device>-<dtype>.png
    python bench/plot.py path/to/file.csv

Each dtype's plot shows one run, the newest commit with rows of that dtype (rows are appended run
after run, and a run need not measure every shape), and of it the newest row of each (provider,
mode, N).
"""
import argparse
import csv
import glob
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402

MODES = ("fwd", "bwd", "fwd_bwd")
STYLE = {"eager": "o-", "compiled": "s-", "gemm-bound": "kx:"}


def is_bench_csv(path):
    """Whether a CSV holds bench/run.py rows (results/ also holds other studies' tables)."""
    with open(path) as f:
        return next(csv.reader(f), None) == harness.CSV_COLUMNS


def newest_rows(path):
    """Per dtype, the rows of the newest commit that has rows of it (an older run's rows of shapes
    the newest did not measure would otherwise be drawn beside it, unmarked), and of those the
    newest of each (provider, mode, N); among the plotted modes only (a whole training step,
    bench/atlop_step.py's mode "step", has no N axis to plot against)."""
    with open(path) as f:
        rows = [row for row in csv.DictReader(f) if row["mode"] in MODES]
    newest_commit = {}
    for row in sorted(rows, key=lambda row: row["timestamp"]):
        newest_commit[row["dtype"]] = row["commit"]
    latest = {}
    for row in rows:
        key = (row["provider"], row["mode"], row["dtype"], int(row["n_pairs"]))
        if row["commit"] == newest_commit[row["dtype"]] and (key not in latest
                                                             or row["timestamp"] >= latest[key]["timestamp"]):
            latest[key] = row
    return list(latest.values())


def plot_file(path):
    rows = newest_rows(path)
    outputs = []
    for dtype in sorted({r["dtype"] for r in rows}):
        fig, axes = plt.subplots(2, len(MODES), figsize=(5 * len(MODES), 8), squeeze=False)
        for col, mode in enumerate(MODES):
            for provider in sorted({r["provider"] for r in rows}):
                sel = sorted((r for r in rows if r["provider"] == provider and r["mode"] == mode
                              and r["dtype"] == dtype), key=lambda r: int(r["n_pairs"]))
                if not sel:
                    continue
                n = [int(r["n_pairs"]) for r in sel]
                style = STYLE.get(provider, "^-")
                axes[0][col].plot(n, [float(r["ms_p50"]) for r in sel], style, label=provider)
                if provider != "gemm-bound":  # its memory is the pre-built feature's GEMM outputs
                    axes[1][col].plot(n, [float(r["peak_mem_mib"]) for r in sel], style, label=provider)
            axes[0][col].set_title(f"{mode} ({dtype})")
            axes[0][col].set_ylabel("median time (ms)")
            axes[1][col].set_ylabel("peak extra memory (MiB)")
            for ax in (axes[0][col], axes[1][col]):
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("entity pairs N")
                ax.grid(True, which="both", alpha=0.3)
                ax.legend(fontsize=8)
        first = next(r for r in rows if r["dtype"] == dtype)
        fig.suptitle(f"group-bilinear head + NCRL, E={first['emb']} B={first['block']} C={first['classes']} "
                     f"on {first['device']}, at {first['commit']}")
        fig.tight_layout()
        stem = os.path.splitext(os.path.basename(path))[0]  # <device>, or <device>-<study>
        out = os.path.join(os.path.dirname(path), f"{stem}-{dtype}.png")
        fig.savefig(out, dpi=110)
        plt.close(fig)
        outputs.append(out)
    return outputs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("csv", nargs="*", help="default: bench/results/*.csv (other CSVs are skipped)")
    args = p.parse_args(argv)
    for path in args.csv or sorted(glob.glob(os.path.join(harness.RESULTS_DIR, "*.csv"))):
        if not is_bench_csv(path):
            print(f"skipped {path}: not a bench/run.py CSV")
            continue
        outputs = plot_file(path)
        if not outputs:
            print(f"skipped {path}: no {'/'.join(MODES)} rows")
        for out in outputs:
            print(f"wrote {out}")


if __name__ == "__main__":
    main()
