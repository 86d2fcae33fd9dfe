"""DocRED data the ATLOP way: features for :class:`ncrl_kernels.atlop.DocREModel`, the official
evaluation (F1 and Ign F1), and a synthetic DocRED-format corpus for offline runs and tests.

A DocRED document is a dict with ``title``, ``sents`` (a list of token lists), ``vertexSet`` (one
list of mentions per entity; a mention has ``name``, ``sent_id``, ``pos`` = [start, end) token
indices in its sentence, ``type``) and, in annotated splits, ``labels`` (``h``, ``t``, ``r``,
``evidence``). The features and metrics follow wzhouad/ATLOP's prepro.py and evaluation.py, which
adapt the official DocRED evaluation.
"""
import collections
import json
import random

import torch

NA_RELATION = "Na"  # column 0 of the labels: the none class
ENTITY_MARKER = "*"  # ATLOP wraps every mention in "*" ... "*"

__all__ = [
    "NA_RELATION", "load_json", "build_rel2id", "read_docred", "collate_fn", "to_official", "train_facts",
    "evaluate", "synthetic_docs", "SYNTHETIC_RELATIONS", "wordpiece_tokenizer",
]


def load_json(path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def build_rel2id(*doc_lists):
    """``{"Na": 0, <relation>: 1, ...}`` over the relations annotated in the given documents, in
    sorted order (so every split built from the same training data agrees). For real DocRED use
    its ``meta/rel2id.json`` instead, so class ids match published checkpoints."""
    relations = sorted({label["r"] for docs in doc_lists for doc in docs for label in doc.get("labels", ())})
    return {NA_RELATION: 0, **{r: i + 1 for i, r in enumerate(relations)}}


def _as_docs(docs):
    return load_json(docs) if isinstance(docs, (str, bytes)) or hasattr(docs, "__fspath__") else docs


def _as_rel2id(rel2id):
    rel2id = load_json(rel2id) if isinstance(rel2id, (str, bytes)) or hasattr(rel2id, "__fspath__") else rel2id
    if not isinstance(rel2id, dict) or rel2id.get(NA_RELATION) != 0:
        raise ValueError(f"rel2id must map {NA_RELATION!r} to 0 (DocRED's meta/rel2id.json does; or use "
                         "build_rel2id(train_docs))")
    return rel2id


def read_docred(docs, tokenizer, rel2id, max_seq_length=1024):
    """ATLOP's ``read_docred``: one feature dict per document.

    Args:
        docs: a list of DocRED documents or the path of a DocRED JSON file.
        tokenizer: a ``transformers`` BERT or RoBERTa tokenizer (``tokenize``,
            ``convert_tokens_to_ids``, ``cls_token_id``, ``sep_token_id``); it must know "*".
        rel2id: relation name -> class id with ``"Na": 0``, or the path of such a JSON file.
        max_seq_length: documents are cut to this many tokens, special tokens included.

    Returns:
        A list of dicts with ``input_ids`` (``[CLS] ... [SEP]``), ``entity_pos`` (per entity, the
        ``(start, end)`` word-piece span of each mention, start on its opening "*"), ``hts`` (every
        ordered pair of distinct entities, annotated pairs first), ``labels`` (per pair a multi-hot
        list over ``rel2id``, ``[1, 0, ...]`` for no relation) and ``title``.
    """
    docs, rel2id = _as_docs(docs), _as_rel2id(rel2id)
    features = []
    for doc in docs:
        entities = doc["vertexSet"]
        starts = {(m["sent_id"], m["pos"][0]) for e in entities for m in e}
        ends = {(m["sent_id"], m["pos"][1] - 1) for e in entities for m in e}
        pieces, sent_maps = [], []
        for sent_id, sent in enumerate(doc["sents"]):
            # word index -> position of its first word piece (its "*" if it opens a mention);
            # the entry one past the last word marks the sentence end.
            sent_map = {}
            for word_id, word in enumerate(sent):
                word_pieces = tokenizer.tokenize(word)
                if (sent_id, word_id) in starts:
                    word_pieces = [ENTITY_MARKER] + word_pieces
                if (sent_id, word_id) in ends:
                    word_pieces = word_pieces + [ENTITY_MARKER]
                sent_map[word_id] = len(pieces)
                pieces.extend(word_pieces)
            sent_map[len(sent)] = len(pieces)
            sent_maps.append(sent_map)

        entity_pos = [[(sent_maps[m["sent_id"]][m["pos"][0]], sent_maps[m["sent_id"]][m["pos"][1]]) for m in e]
                      for e in entities]

        relations_of_pair = {}
        for label in doc.get("labels", ()):
            if label["r"] not in rel2id:
                raise ValueError(f"relation {label['r']!r} of document {doc['title']!r} is not in rel2id; build "
                                 "rel2id from all splits or pass DocRED's meta/rel2id.json")
            relations_of_pair.setdefault((label["h"], label["t"]), set()).add(rel2id[label["r"]])
        hts, labels = [], []
        for (h, t), relation_ids in relations_of_pair.items():
            hts.append([h, t])
            labels.append([int(c in relation_ids) for c in range(len(rel2id))])
        for h in range(len(entities)):
            for t in range(len(entities)):
                if h != t and (h, t) not in relations_of_pair:
                    hts.append([h, t])
                    labels.append([1] + [0] * (len(rel2id) - 1))

        # [CLS] ... [SEP]: the single-sequence input of both BERT and RoBERTa (ATLOP calls
        # build_inputs_with_special_tokens, which transformers 5 no longer has).
        input_ids = tokenizer.convert_tokens_to_ids(pieces[:max_seq_length - 2])
        features.append({
            "input_ids": [tokenizer.cls_token_id] + input_ids + [tokenizer.sep_token_id],
            "entity_pos": entity_pos,
            "labels": labels,
            "hts": hts,
            "title": doc["title"],
        })
    return features


def collate_fn(batch):
    """ATLOP's batching: ``(input_ids, attention_mask, labels, entity_pos, hts)``, ids padded with 0
    (masked, so the pad id does not matter), the last three as per-document lists."""
    max_len = max(len(f["input_ids"]) for f in batch)
    input_ids = torch.tensor([f["input_ids"] + [0] * (max_len - len(f["input_ids"])) for f in batch])
    attention_mask = torch.tensor([[1.0] * len(f["input_ids"]) + [0.0] * (max_len - len(f["input_ids"]))
                                   for f in batch])
    return (input_ids, attention_mask, [f["labels"] for f in batch], [f["entity_pos"] for f in batch],
            [f["hts"] for f in batch])


def pair_labels(label_lists, num_classes):
    """ATLOP's per-document label lists (collate_fn's, or each feature's "labels") as one
    ``[pairs, num_classes]`` tensor, documents in order; a document without pairs has labels []."""
    tensors = []
    for doc_id, labels in enumerate(label_lists):
        labels = torch.as_tensor(labels)
        if labels.numel() == 0:
            labels = labels.reshape(0, num_classes)
        # Checked, not reshaped: rows of another width would reshape into wrong rows silently, and
        # the usual cause is DocREModel's config.num_labels left at transformers' default of 2.
        if labels.ndim != 2 or labels.shape[1] != num_classes:
            raise ValueError(
                f"the labels of document {doc_id} must be rows of {num_classes} classes (the model's "
                f"config.num_labels), got shape {list(labels.shape)}; set config.num_labels to the number of "
                f"relation classes including {NA_RELATION!r} (len(rel2id): 97 for DocRED)")
        tensors.append(labels)
    return torch.cat(tensors)


def to_official(preds, features, rel2id):
    """ATLOP's ``to_official``: predictions ``[N, C]`` (rows in the order of the features' ``hts``,
    as :class:`DocREModel` returns them; tensor or array) -> official answers
    ``{"title", "h_idx", "t_idx", "r"}`` for every predicted class except "Na"."""
    rel2id = _as_rel2id(rel2id)
    id2rel = {i: r for r, i in rel2id.items()}
    pairs = [(f["title"], h, t) for f in features for h, t in f["hts"]]
    preds = torch.as_tensor(preds)
    if preds.ndim != 2 or preds.shape != (len(pairs), len(rel2id)):
        raise ValueError(f"preds must have shape [pairs in features, classes] = {[len(pairs), len(rel2id)]}, "
                         f"got {list(preds.shape)}")
    answers = []
    for row, col in preds.nan_to_num(0.0).nonzero().tolist():
        if col != 0:
            title, h, t = pairs[row]
            answers.append({"title": title, "h_idx": h, "t_idx": t, "r": id2rel[col]})
    return answers


def train_facts(train_docs):
    """The official ``gen_train_facts``: every (head mention name, tail mention name, relation)
    annotated in the training documents."""
    return {(m1["name"], m2["name"], label["r"])
            for doc in _as_docs(train_docs) for label in doc.get("labels", ())
            for m1 in doc["vertexSet"][label["h"]] for m2 in doc["vertexSet"][label["t"]]}


def _f1(precision, recall):
    return 0.0 if precision + recall == 0 else 2.0 * precision * recall / (precision + recall)


def evaluate(predictions, gold_docs, train_docs=None):
    """The official DocRED relation metrics for any annotated split (ATLOP's ``official_evaluate``).

    Args:
        predictions: answers ``{"title", "h_idx", "t_idx", "r", ...}`` (e.g. from :func:`to_official`).
        gold_docs: the annotated documents (or their JSON path) the predictions are scored against.
        train_docs: training documents (or path) for Ign F1; None counts no fact as seen in training.

    Returns:
        ``{"precision", "recall", "f1", "ign_f1"}`` as fractions. Duplicate answers count once;
        answers for titles not in ``gold_docs`` count as wrong. Ign F1 removes correct answers whose
        (head mention name, tail mention name, relation) appears in ``train_docs`` from the
        precision (with the official +1e-5 in its denominator) and keeps the recall unchanged.
    """
    gold_docs = _as_docs(gold_docs)
    seen_in_train = train_facts(train_docs) if train_docs is not None else set()
    entities_of = {doc["title"]: doc["vertexSet"] for doc in gold_docs}
    gold = {(doc["title"], label["r"], label["h"], label["t"]) for doc in gold_docs for label in doc.get("labels", ())}
    answers = {(a["title"], a["r"], a["h_idx"], a["t_idx"]) for a in predictions}

    correct = answers & gold
    correct_seen = sum(
        any((m1["name"], m2["name"], r) in seen_in_train for m1 in entities_of[title][h] for m2 in entities_of[title][t])
        for title, r, h, t in correct
    )
    precision = len(correct) / len(answers) if answers else 0.0
    recall = len(correct) / len(gold) if gold else 0.0
    ign_precision = (len(correct) - correct_seen) / (len(answers) - correct_seen + 1e-5)
    return {"precision": precision, "recall": recall, "f1": _f1(precision, recall),
            "ign_f1": _f1(ign_precision, recall)}


# The synthetic corpus: each relation is stated by its own sentence pattern around the two
# mentions, so a model can learn it from the text; "visited"/"met" sentences put pairs together
# without a relation. Same-pattern relations (born in a place / in a year) differ only by the
# tail's type, and "founded" names the tail first, so the encoder has to read the mentions too.
# id: (name, head type, tail type, pattern, also holds tail -> head)
SYNTHETIC_RELATIONS = {
    "P19": ("place of birth", "PER", "LOC", "{h} was born in {t} .", False),
    "P569": ("date of birth", "PER", "TIME", "{h} was born in {t} .", False),
    "P20": ("place of death", "PER", "LOC", "{h} died in {t} .", False),
    "P108": ("employer", "PER", "ORG", "{h} worked for {t} .", False),
    "P112": ("founded by", "ORG", "PER", "{t} founded {h} .", False),
    "P571": ("inception", "ORG", "TIME", "{h} was established in {t} .", False),
    "P159": ("headquarters location", "ORG", "LOC", "{h} is headquartered in {t} .", False),
    "P17": ("country", "LOC", "LOC", "{h} is a city in {t} .", False),
    "P26": ("spouse", "PER", "PER", "{h} married {t} .", True),
}
# One sentence stating two relations of the same pair: multi-label pairs.
_MULTI_PATTERNS = [(("P19", "P20"), "{h} was born and died in {t} .")]
_NO_RELATION_PATTERNS = ["{h} visited {t} .", "{h} met {t} .", "{h} and {t} were mentioned together ."]
_MENTION_PATTERNS = ["{e} was well known .", "Later , {e} became famous .", "Many wrote about {e} ."]
_FILLERS = ["It rained that year .", "The records were lost .", "Nothing else is known ."]
_SYLLABLES = ["ka", "lo", "mi", "ren", "tar", "vo", "bel", "su", "dor", "an", "ve", "li", "mor", "za", "qu", "ni",
              "ra", "tel", "o", "pen"]


def _name_pools(seed=1234):
    """Fixed pools of entity names shared by every split, so dev facts can repeat training facts
    (what Ign F1 discounts)."""
    rng = random.Random(seed)

    def word(parts):
        return "".join(rng.choice(_SYLLABLES) for _ in range(parts)).capitalize()

    return {
        "PER": sorted({f"{word(2)} {word(rng.randint(2, 3))}" for _ in range(150)}),
        "LOC": sorted({word(rng.randint(2, 3)) for _ in range(50)}),
        "ORG": sorted({f"{word(2)} {rng.choice(['Corp', 'Institute', 'Group'])}" for _ in range(50)}),
        "TIME": [str(year) for year in range(1900, 2000)],
    }


def synthetic_docs(num_docs, *, seed=0, title_prefix="doc"):
    """``num_docs`` DocRED-format documents whose relations are learnable from the text (see
    ``SYNTHETIC_RELATIONS``): 4-7 entities, a few relation statements (some pairs with two
    relations, spouse in both directions), no-relation statements, re-mentions and fillers; most
    entity pairs have no relation, as in DocRED. Deterministic for a given ``seed``; titles are
    ``f"{title_prefix}-{seed}-{i}"``."""
    rng = random.Random(seed)
    pools = _name_pools()
    docs = []
    for doc_id in range(num_docs):
        types = [rng.choice(["PER", "PER", "ORG", "ORG", "LOC", "LOC", "TIME"]) for _ in range(rng.randint(4, 7))]
        # sorted: set order follows string hashing, which changes between processes.
        names = {kind: iter(rng.sample(pools[kind], types.count(kind))) for kind in sorted(set(types))}
        entity_names = [next(names[kind]) for kind in types]
        sentences = []  # (pattern, slot -> entity index)
        facts = []  # (h, t, relation, sentence index)

        pairs = [(h, t) for h in range(len(types)) for t in range(len(types)) if h != t]
        rng.shuffle(pairs)
        used_pairs = set()
        for _ in range(rng.randint(2, 4)):
            # Each statement is about a new pair; three in four state relations, the rest put a
            # pair together without one.
            fitting = {(h, t): [r for r, (_, ht, tt, _, _) in SYNTHETIC_RELATIONS.items() if (ht, tt) == (types[h], types[t])]
                       for h, t in pairs if frozenset((h, t)) not in used_pairs}
            if not fitting:
                break
            related = [pair for pair, relations in fitting.items() if relations]
            if related and rng.random() < 0.75:
                h, t = related[0]
                multi = [(rs, p) for rs, p in _MULTI_PATTERNS if set(rs) <= set(fitting[h, t])]
                if multi and rng.random() < 0.3:
                    relations, pattern = rng.choice(multi)
                else:
                    relation = rng.choice(fitting[h, t])
                    relations, pattern = (relation,), SYNTHETIC_RELATIONS[relation][3]
                for relation in relations:
                    facts.append((h, t, relation, len(sentences)))
                    if SYNTHETIC_RELATIONS[relation][4]:
                        facts.append((t, h, relation, len(sentences)))
            else:
                h, t = next(iter(fitting))
                pattern = rng.choice(_NO_RELATION_PATTERNS)
            sentences.append((pattern, {"h": h, "t": t}))
            used_pairs.add(frozenset((h, t)))
        mentioned = {e for _, slots in sentences for e in slots.values()}
        for e in range(len(types)):
            if e not in mentioned or rng.random() < 0.2:
                sentences.append((rng.choice(_MENTION_PATTERNS), {"e": e}))
        sentences.append((rng.choice(_FILLERS), {}))

        order = list(range(len(sentences)))
        rng.shuffle(order)
        sent_id_of = {old: new for new, old in enumerate(order)}
        sents, vertex_set = [], [[] for _ in types]
        for old in order:
            pattern, slots = sentences[old]
            tokens = []
            for word in pattern.split():
                if word.startswith("{"):
                    e = slots[word[1:-1]]
                    name = entity_names[e].split()
                    vertex_set[e].append({"name": entity_names[e], "sent_id": len(sents),
                                          "pos": [len(tokens), len(tokens) + len(name)], "type": types[e]})
                    tokens.extend(name)
                else:
                    tokens.append(word)
            sents.append(tokens)
        labels = [{"h": h, "t": t, "r": r, "evidence": [sent_id_of[s]]} for h, t, r, s in facts]
        docs.append({"title": f"{title_prefix}-{seed}-{doc_id}", "sents": sents, "vertexSet": vertex_set,
                     "labels": labels})
    return docs


def wordpiece_tokenizer(docs, vocab_size=2000):
    """A cased BERT-style WordPiece tokenizer for the documents' words (offline: nothing is
    downloaded), with [PAD] = 0, [UNK], [CLS], [SEP], [MASK] and the entity marker "*".

    Its vocabulary is built, not trained, so the same documents give the same token ids in every
    process (tokenizers' WordPiece trainer broke ties in hash order: a different vocabulary per run,
    and per rank under torchrun): the special tokens, every character of the documents alone and
    as a "##" continuation (all of them, whatever `vocab_size`), then whole words, most frequent
    first (ties by spelling), up to `vocab_size`. A word outside it is spelt in characters; one
    with a character the documents never had is [UNK]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    normalizer, pre_tokenizer = normalizers.BertNormalizer(lowercase=False), pre_tokenizers.BertPreTokenizer()
    counts = collections.Counter(
        word for doc in _as_docs(docs) for sent in doc["sents"]
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(" ".join(sent))))
    chars = sorted({char for word in counts for char in word} - {ENTITY_MARKER})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", ENTITY_MARKER, *chars, *("##" + c for c in chars)]
    words = [word for word, _ in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if len(word) > 1]
    vocab += words[:max(0, vocab_size - len(vocab))]
    backend = Tokenizer(models.WordPiece({token: i for i, token in enumerate(vocab)}, unk_token="[UNK]"))
    backend.normalizer, backend.pre_tokenizer = normalizer, pre_tokenizer
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]",
                                   cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")
