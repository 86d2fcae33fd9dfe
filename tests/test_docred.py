"""ncrl_kernels.docred against hand-built documents: ATLOP's features, the official metrics (dedup,
Ign F1), to_official, and the synthetic corpus and tokenizer."""
import json
import os
import subprocess
import sys

import pytest
import torch

from ncrl_kernels import docred


class FourCharTokenizer:
    """A stand-in word-piece tokenizer: words split every 4 characters ("Norway" -> "Norw", "##ay")."""
    cls_token_id, sep_token_id = 1, 2

    def __init__(self):
        self.vocab = {"[PAD]": 0, "[CLS]": 1, "[SEP]": 2}

    def tokenize(self, word):
        return [("##" if i else "") + word[i:i + 4] for i in range(0, len(word), 4)]

    def convert_tokens_to_ids(self, tokens):
        return [self.vocab.setdefault(t, len(self.vocab)) for t in tokens]


def mention(name, sent_id, start, end, kind="LOC"):
    return {"name": name, "sent_id": sent_id, "pos": [start, end], "type": kind}


def oslo_doc(title="T1"):
    """Three entities; Oslo has two mentions under different names; pair (0, 1) has two relations;
    (1, 2, P17) is annotated twice, as some DocRED facts are."""
    return {
        "title": title,
        "sents": [["Anna", "Berg", "lives", "in", "Oslo", "."], ["Oslo", "City", "is", "in", "Norway", "."]],
        "vertexSet": [
            [mention("Anna Berg", 0, 0, 2, "PER")],
            [mention("Oslo", 0, 4, 5), mention("Oslo City", 1, 0, 2)],
            [mention("Norway", 1, 4, 5)],
        ],
        "labels": [
            {"h": 1, "t": 2, "r": "P17", "evidence": [1]},
            {"h": 0, "t": 1, "r": "P551", "evidence": [0]},
            {"h": 0, "t": 1, "r": "P19", "evidence": [0]},
            {"h": 1, "t": 2, "r": "P17", "evidence": [0, 1]},
        ],
    }


REL2ID = {"Na": 0, "P17": 1, "P19": 2, "P551": 3}


def test_build_rel2id_puts_na_first_and_sorts():
    assert docred.build_rel2id([oslo_doc()]) == REL2ID
    assert docred.build_rel2id([{"labels": []}], [{}]) == {"Na": 0}


def test_read_docred_features_match_atlop():
    (f,) = docred.read_docred([oslo_doc()], FourCharTokenizer(), REL2ID)
    tok = FourCharTokenizer()
    pieces = (["*", "Anna", "Berg", "*", "live", "##s", "in", "*", "Oslo", "*", "."]
              + ["*", "Oslo", "City", "*", "is", "in", "*", "Norw", "##ay", "*", "."])
    assert f["input_ids"] == [1] + tok.convert_tokens_to_ids(pieces) + [2]
    # (start on the opening "*", end one past the closing "*") per mention.
    assert f["entity_pos"] == [[(0, 4)], [(7, 10), (11, 15)], [(17, 21)]]
    # Annotated pairs first (in annotation order), then every other ordered pair.
    assert f["hts"] == [[1, 2], [0, 1], [0, 2], [1, 0], [2, 0], [2, 1]]
    assert f["labels"] == [[0, 1, 0, 0], [0, 0, 1, 1]] + [[1, 0, 0, 0]] * 4
    assert f["title"] == "T1"


def test_read_docred_truncates_and_reads_files(tmp_path):
    path = tmp_path / "docs.json"
    path.write_text(json.dumps([oslo_doc()]))
    rel2id_path = tmp_path / "rel2id.json"
    rel2id_path.write_text(json.dumps(REL2ID))
    (f,) = docred.read_docred(str(path), FourCharTokenizer(), rel2id_path, max_seq_length=10)
    assert len(f["input_ids"]) == 10 and f["input_ids"][-1] == 2
    assert f["entity_pos"][2] == [(17, 21)]  # positions stay; the model skips cut-off mentions


def test_read_docred_rejects_bad_relation_maps():
    with pytest.raises(ValueError, match="'P551' of document 'T1' is not in rel2id"):
        docred.read_docred([oslo_doc()], FourCharTokenizer(), {"Na": 0, "P17": 1, "P19": 2})
    with pytest.raises(ValueError, match="rel2id must map 'Na' to 0"):
        docred.read_docred([oslo_doc()], FourCharTokenizer(), {"P17": 0})


def test_unlabelled_documents_get_na_rows():
    doc = {key: value for key, value in oslo_doc().items() if key != "labels"}
    (f,) = docred.read_docred([doc], FourCharTokenizer(), REL2ID)
    assert f["hts"] == [[0, 1], [0, 2], [1, 0], [1, 2], [2, 0], [2, 1]]
    assert f["labels"] == [[1, 0, 0, 0]] * 6


def test_collate_fn_pads_like_atlop():
    features = docred.read_docred([oslo_doc(), dict(oslo_doc("T2"), sents=[["Anna", "Berg", "."], ["Oslo", "City",
                                                                                                  "Norway", "."]],
                                                   vertexSet=[[mention("Anna Berg", 0, 0, 2)],
                                                              [mention("Oslo City", 1, 0, 2)],
                                                              [mention("Norway", 1, 2, 3)]])],
                                  FourCharTokenizer(), REL2ID)
    input_ids, mask, labels, entity_pos, hts = docred.collate_fn(features)
    n0, n1 = (len(f["input_ids"]) for f in features)
    assert input_ids.shape == mask.shape == (2, max(n0, n1)) and n1 < n0
    assert input_ids.dtype == torch.long and mask.dtype == torch.float32
    assert input_ids[1, n1:].eq(0).all() and mask[1, :n1].eq(1).all() and mask[1, n1:].eq(0).all()
    assert labels == [f["labels"] for f in features] and hts == [f["hts"] for f in features]
    assert entity_pos == [f["entity_pos"] for f in features]


def test_pair_labels_stacks_documents_and_checks_the_row_width():
    rows = [[0, 1, 0, 0], [1, 0, 0, 0]]
    labels = docred.pair_labels([rows, [], [[1, 0, 0, 0]]], num_classes=4)  # [] = a document without pairs
    assert torch.equal(labels, torch.tensor(rows + [[1, 0, 0, 0]]))
    # Rows of 4 classes with num_classes=2 used to reshape into twice as many rows of 2.
    with pytest.raises(ValueError, match=r"document 1 must be rows of 2 classes \(the model's config.num_labels\), "
                                         r"got shape \[2, 4\]"):
        docred.pair_labels([[], rows], num_classes=2)
    with pytest.raises(ValueError, match=r"got shape \[4\]"):
        docred.pair_labels([rows[0]], num_classes=4)


def answer(title, h, t, r):
    return {"title": title, "h_idx": h, "t_idx": t, "r": r}


def test_evaluate_official_semantics():
    gold = [oslo_doc("T1"), dict(oslo_doc("T2"), labels=[{"h": 0, "t": 2, "r": "P19", "evidence": []}])]
    # "Oslo City" is a mention name of T1's entity 1: its fact with Norway was seen in training.
    train = [{"title": "train-0", "vertexSet": [[mention("Oslo City", 0, 0, 2)], [mention("Norway", 0, 3, 4)]],
              "labels": [{"h": 0, "t": 1, "r": "P17", "evidence": []}], "sents": []}]
    predictions = [
        answer("T1", 1, 2, "P17"),  # correct, seen in training
        answer("T1", 1, 2, "P17"),  # duplicate: counted once
        answer("T1", 0, 1, "P19"),  # correct
        answer("T1", 0, 2, "P17"),  # wrong
        answer("T9", 0, 1, "P17"),  # title not in the gold split: wrong
    ]
    # Gold facts: T1 (1,2,P17) (annotated twice, counted once), (0,1,P551), (0,1,P19); T2 (0,2,P19).
    scores = docred.evaluate(predictions, gold, train)
    assert scores["precision"] == pytest.approx(2 / 4) and scores["recall"] == pytest.approx(2 / 4)
    assert scores["f1"] == pytest.approx(0.5)
    ign_precision = (2 - 1) / (4 - 1 + 1e-5)  # the seen fact leaves numerator and denominator
    assert scores["ign_f1"] == pytest.approx(2 * ign_precision * 0.5 / (ign_precision + 0.5), rel=1e-12)
    assert scores["ign_f1"] == pytest.approx(0.4, rel=1e-5)

    unseen = docred.evaluate(predictions, gold)
    assert unseen["f1"] == scores["f1"] and unseen["ign_f1"] == pytest.approx(0.5, rel=1e-5)


def test_evaluate_edge_cases(tmp_path):
    gold = [oslo_doc()]
    assert docred.evaluate([], gold) == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "ign_f1": 0.0}
    path = tmp_path / "dev.json"
    path.write_text(json.dumps(gold))
    scores = docred.evaluate([answer("T1", 0, 1, "P551")], str(path), str(path))
    assert scores["precision"] == 1.0 and scores["recall"] == pytest.approx(1 / 3)
    assert scores["ign_f1"] == 0.0  # its only correct answer was seen in "training"


def test_to_official_round_trip():
    gold = [oslo_doc("T1"), oslo_doc("T2")]
    features = docred.read_docred(gold, FourCharTokenizer(), REL2ID)
    preds = torch.tensor([row for f in features for row in f["labels"]], dtype=torch.float32)
    answers = docred.to_official(preds, features, REL2ID)
    assert sorted((a["title"], a["h_idx"], a["t_idx"], a["r"]) for a in answers) == sorted(
        (doc["title"], label["h"], label["t"], label["r"]) for doc in gold for label in doc["labels"][:3])
    assert docred.evaluate(answers, gold) == pytest.approx({"precision": 1.0, "recall": 1.0, "f1": 1.0,
                                                            "ign_f1": 1.0})
    assert docred.to_official(preds.numpy(), features, REL2ID) == answers
    with pytest.raises(ValueError, match=r"preds must have shape \[pairs in features, classes\] = \[12, 4\]"):
        docred.to_official(preds[:-1], features, REL2ID)


def test_synthetic_docs_are_valid_deterministic_and_mostly_none():
    docs = docred.synthetic_docs(60, seed=7)
    assert docs == docred.synthetic_docs(60, seed=7) and docs != docred.synthetic_docs(60, seed=8)
    assert len({d["title"] for d in docs}) == 60
    patterns = {r: spec[3] for r, spec in docred.SYNTHETIC_RELATIONS.items()}
    pairs = positive_pairs = 0
    for doc in docs:
        entities = doc["vertexSet"]
        for entity in entities:
            assert entity, "every entity is mentioned"
            for m in entity:
                assert doc["sents"][m["sent_id"]][m["pos"][0]:m["pos"][1]] == m["name"].split()
        for label in doc["labels"]:
            _, head_type, tail_type, _, symmetric = docred.SYNTHETIC_RELATIONS[label["r"]]
            h, t = entities[label["h"]], entities[label["t"]]
            assert (h[0]["type"], t[0]["type"]) == (head_type, tail_type)
            # The relation is stated by its evidence sentence, in its own words.
            (sentence,) = [" ".join(doc["sents"][s]) for s in label["evidence"]]
            names = [h[0]["name"], t[0]["name"]]
            stated = {patterns[label["r"]].format(h=a, t=b) for a, b in (names, names[::-1])}
            assert sentence in stated or "born and died in" in sentence
        pairs += len(entities) * (len(entities) - 1)
        positive_pairs += len({(label["h"], label["t"]) for label in doc["labels"]})
    assert 0.03 < positive_pairs / pairs < 0.3  # most pairs are "Na", as in DocRED
    assert set(docred.build_rel2id(docs)) == {"Na", *docred.SYNTHETIC_RELATIONS}


def test_synthetic_docs_do_not_depend_on_string_hashing():
    """Same documents in every process, whatever PYTHONHASHSEED (set iteration order) is."""
    code = "import json; from ncrl_kernels import docred; print(json.dumps(docred.synthetic_docs(30, seed=5)))"
    outputs = {subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2")}
    assert len(outputs) == 1


def test_wordpiece_tokenizer_is_the_same_in_every_process():
    """Same documents, same token ids in every process (every rank of a torchrun job builds its own):
    tokenizers' WordPiece trainer gave a different vocabulary per run."""
    pytest.importorskip("transformers")
    code = ("import json; from ncrl_kernels import docred; "
            "tokenizer = docred.wordpiece_tokenizer(docred.synthetic_docs(30, seed=5), 300); "
            "print(json.dumps(sorted(tokenizer.get_vocab().items())))")
    outputs = [subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONHASHSEED=seed),
                              capture_output=True, text=True, check=True).stdout for seed in ("1", "2", "3")]
    assert len(set(outputs)) == 1 and len(json.loads(outputs[0])) == 300


def test_wordpiece_tokenizer_knows_the_marker():
    pytest.importorskip("transformers")
    docs = docred.synthetic_docs(20, seed=0)
    tokenizer = docred.wordpiece_tokenizer(docs, vocab_size=300)
    assert tokenizer.pad_token_id == 0 and tokenizer.tokenize("*") == ["*"]
    assert tokenizer.unk_token not in tokenizer.tokenize(" ".join(docs[0]["sents"][0]))
    star = tokenizer.convert_tokens_to_ids("*")
    for f in docred.read_docred(docs, tokenizer, docred.build_rel2id(docs)):
        assert f["input_ids"][0] == tokenizer.cls_token_id and f["input_ids"][-1] == tokenizer.sep_token_id
        for entity in f["entity_pos"]:
            for start, end in entity:  # +1: [CLS]
                assert f["input_ids"][start + 1] == star and f["input_ids"][end] == star
