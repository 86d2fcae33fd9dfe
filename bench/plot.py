#!/usr/bin/env python
"""Plots of the benchmark CSVs: time and peak extra memory against N, per mode and dtype.

    python bench/plot.py                      # every bench/run.py CSV in bench/results -> <device>-<dtype>.png
    python bench/plot.py path/to/file.csv

For each (provider, mode, dtype, N) the newest row is plotted (rows are appended run after run).
A run need not measure every shape: points of an older commit than the dtype's newest are drawn
hollow, and the title names the commits.
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
STYLE = {"eager": "o-", "compiled": "s-", "gemm-bound": "x:"}
# One color per provider in every plot (a provider's "+graph" rows too); others take the next ones.
COLORS = {"eager": "C0", "compiled": "C1", "gemm-bound": "k", "fused-cpp": "C2", "fused-triton": "C3",
          "fused-triton-jit": "C4", "fused-cuda": "C5"}


def is_bench_csv(path):
    """Whether a CSV holds bench/run.py rows (results/ also holds other studies' tables)."""
    with open(path) as f:
        return next(csv.reader(f), None) == harness.CSV_COLUMNS


def newest_rows(path):
    """The newest row of each (provider, mode, dtype, N) among the plotted modes (a whole training
    step, bench/atlop_step.py's modes "step" and "head", has no N axis to plot against)."""
    latest = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            if row["mode"] not in MODES:
                continue
            key = (row["provider"], row["mode"], row["dtype"], int(row["n_pairs"]))
            if key not in latest or row["timestamp"] >= latest[key]["timestamp"]:
                latest[key] = row
    return list(latest.values())


def commits_newest_first(rows):
    """The commits of `rows`, the one of the newest row first."""
    commits = [row["commit"] for row in sorted(rows, key=lambda row: row["timestamp"], reverse=True)]
    return list(dict.fromkeys(commits))


def provider_style(provider, bases):
    """(format, color) of a provider's line, the same in every plot: each provider its marker and
    color (COLORS; a provider not there the next free one in the order of `bases`, the plot's
    sorted names without the "+graph" suffix); its rows replayed from a CUDA graph (bench/run.py
    --cuda-graphs) its color with stars, dashed."""
    base = provider.removesuffix(harness.GRAPH)
    unknown = [b for b in bases if b not in COLORS]
    color = COLORS.get(base) or f"C{len(COLORS) - 1 + unknown.index(base)}"
    return ("*--" if provider != base else STYLE.get(base, "^-")), color


def plot_points(ax, rows, column, style, label, newest_commit):
    """One provider's line through `rows` (sorted by N), its points of commits older than
    `newest_commit` hollow; `style`: provider_style's (format, color)."""
    n = [int(r["n_pairs"]) for r in rows]
    fmt, color = style
    (line,) = ax.plot(n, [float(r[column]) for r in rows], fmt, color=color, label=label)
    older = [r for r in rows if r["commit"] != newest_commit]
    if older:
        ax.plot([int(r["n_pairs"]) for r in older], [float(r[column]) for r in older], linestyle="none",
                marker=line.get_marker(), color=line.get_color(), markerfacecolor="white")


def plot_file(path):
    rows = newest_rows(path)
    bases = sorted({r["provider"].removesuffix(harness.GRAPH) for r in rows})
    outputs = []
    for dtype in sorted({r["dtype"] for r in rows}):
        commits = commits_newest_first([r for r in rows if r["dtype"] == dtype])
        modes = [mode for mode in MODES if any(r["mode"] == mode and r["dtype"] == dtype for r in rows)]
        fig, axes = plt.subplots(2, len(modes), figsize=(5 * len(modes), 8), squeeze=False)
        for col, mode in enumerate(modes):
            for provider in sorted({r["provider"] for r in rows}):
                sel = sorted((r for r in rows if r["provider"] == provider and r["mode"] == mode
                              and r["dtype"] == dtype), key=lambda r: int(r["n_pairs"]))
                if not sel:
                    continue
                style = provider_style(provider, bases)
                plot_points(axes[0][col], sel, "ms_p50", style, provider, commits[0])
                if not provider.startswith("gemm-bound"):  # its memory is the pre-built feature's GEMM outputs
                    plot_points(axes[1][col], sel, "peak_mem_mib", style, provider, commits[0])
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
        older = f" (hollow: {', '.join(commits[1:])})" if len(commits) > 1 else ""
        fig.suptitle(f"group-bilinear head + NCRL, E={first['emb']} B={first['block']} C={first['classes']} "
                     f"on {first['device']}, at {commits[0]}{older}")
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
