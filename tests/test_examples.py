"""Smoke runs of examples/train_docred.py (synthetic and from DocRED files + a local model) and of
bench/quality.py, tiny and offline (the hub is switched off for the child processes)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from ncrl_kernels import docred  # noqa: E402
from ncrl_kernels.atlop import DocREModel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = ["--hidden-size", "16", "--layers", "1", "--heads", "2", "--emb-size", "32", "--block-size", "8"]


def run(script, *args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()


def check_training_output(lines, epochs):
    assert [line.split(":")[0] for line in lines if line.startswith("epoch")] == [
        f"epoch {e + 1}/{epochs}" for e in range(epochs)]
    assert all("dev F1" in line and "Ign F1" in line for line in lines if line.startswith("epoch"))
    scores = json.loads(lines[-1])
    assert set(scores) == {"dev_f1", "dev_ign_f1"} and all(0.0 <= v <= 1.0 for v in scores.values())


def test_train_docred_synthetic_smoke():
    lines = run("examples/train_docred.py", "--train-docs", "12", "--dev-docs", "6", "--epochs", "2",
                "--batch-size", "4", "--vocab-size", "300", *TINY_MODEL)
    check_training_output(lines, epochs=2)


def test_train_docred_from_files_and_local_model(tmp_path):
    """The --train/--dev/--model path: DocRED JSON files and a model directory saved with
    save_pretrained (as a downloaded bert-base-cased would be), then the checkpoint it writes
    loads strictly into DocREModel."""
    train, dev = docred.synthetic_docs(10, seed=1), docred.synthetic_docs(5, seed=2)
    for name, docs in (("train.json", train), ("dev.json", dev)):
        (tmp_path / name).write_text(json.dumps(docs))
    rel2id = docred.build_rel2id(train, dev)
    (tmp_path / "rel2id.json").write_text(json.dumps(rel2id))
    tokenizer = docred.wordpiece_tokenizer(train, vocab_size=300)
    config = transformers.BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, intermediate_size=32)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    tokenizer.save_pretrained(tmp_path / "bert")

    lines = run("examples/train_docred.py", "--train", str(tmp_path / "train.json"), "--dev", str(tmp_path / "dev.json"),
                "--rel2id", str(tmp_path / "rel2id.json"), "--model", str(tmp_path / "bert"), "--epochs", "1",
                "--batch-size", "4", "--emb-size", "32", "--block-size", "8", "--save", str(tmp_path / "model.pt"))
    check_training_output(lines, epochs=1)

    config = transformers.AutoConfig.from_pretrained(tmp_path / "bert", num_labels=len(rel2id))
    config.transformer_type, config.cls_token_id, config.sep_token_id = "bert", 0, 0
    model = DocREModel(config, transformers.AutoModel.from_config(config), 32, 8)
    model.load_state_dict(torch.load(tmp_path / "model.pt", weights_only=True), strict=True)


def test_quality_bench_smoke(tmp_path):
    lines = run("bench/quality.py", "--seeds", "1", "--train-pairs", "600", "--epochs", "2", "--out", str(tmp_path))
    table = (tmp_path / "quality.md").read_text()
    for loss in ("NCRL (gamma=0)", "NCRL (gamma=0.05)", "ATL", "BCE"):
        assert loss in table
    rows = (tmp_path / "quality.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + 3 * 4  # header + (3 noise rates x 4 losses) x 1 seed
    assert (tmp_path / "quality.png").stat().st_size > 0
    assert any("F1" in line for line in lines)
