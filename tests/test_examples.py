"""Smoke runs of examples/train_docred.py (the script-path entry to ncrl_kernels.train_docred,
tested in full in test_train_docred.py) and of bench/quality.py, tiny and offline (the hub is
switched off for the child processes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def run(script, *args, cwd=None):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def test_train_docred_example_runs_the_offline_demo(tmp_path):
    lines = run("examples/train_docred.py", "--synthetic_train_docs", "12", "--synthetic_dev_docs", "6",
                "--num_train_epochs", "2", "--train_batch_size", "4", "--vocab_size", "300", "--encoder_hidden_size",
                "16", "--encoder_layers", "1", "--encoder_heads", "2", "--emb_size", "32", "--block_size", "8",
                cwd=tmp_path)
    scores = [json.loads(line) for line in lines]
    assert [s["epoch"] for s in scores] == [1, 2]
    assert all(0.0 <= s[name] <= 1.0 for s in scores for name in ("dev_f1", "dev_ign_f1"))


def test_quality_bench_smoke(tmp_path):
    lines = run("bench/quality.py", "--seeds", "1", "--train-pairs", "600", "--epochs", "2", "--out", str(tmp_path))
    table = (tmp_path / "quality.md").read_text()
    for loss in ("NCRL (gamma=0)", "NCRL (gamma=0.05)", "ATL", "BCE"):
        assert loss in table
    rows = (tmp_path / "quality.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 4  # header + (3 noise rates x 4 losses) x 1 seed
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert any("F1" in line for line in lines)
