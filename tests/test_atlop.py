"""ncrl_kernels.atlop.DocREModel against ATLOP's original model on a tiny random BERT: the same
loss, predictions and gradients from the same (strictly loaded) checkpoint; eager attention; the
two-window long-input scheme; documents without pairs."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from ncrl_kernels import docred  # noqa: E402
from ncrl_kernels.atlop import PRESETS, WINDOW, DocREModel, process_long_input, use_eager_attention  # noqa: E402
from ncrl_kernels.metrics import ncre  # noqa: E402

from atlop_original import OriginalDocREModel  # noqa: E402

pytestmark = pytest.mark.usefixtures("ieee_fp32")

EMB, BLOCK = 32, 8


@pytest.fixture(scope="module")
def corpus():
    docs = docred.synthetic_docs(6, seed=3)
    tokenizer = docred.wordpiece_tokenizer(docs, vocab_size=300)
    rel2id = docred.build_rel2id(docs)
    return docs, tokenizer, rel2id, docred.read_docred(docs, tokenizer, rel2id)


def tiny_bert(tokenizer, num_classes, *, seed=0, **overrides):
    """A 2-layer BERT without dropout (so training-mode forwards are deterministic), with ATLOP's
    config attributes set; its default attention implementation is SDPA."""
    torch.manual_seed(seed)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=num_classes, **overrides)
    config.transformer_type = "bert"
    config.cls_token_id, config.sep_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return config, transformers.BertModel(config)


def model_pair(corpus, **head_args):
    """(ATLOP's original model, ours loaded from its state dict with strict=True)."""
    _, tokenizer, rel2id, _ = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id))
    original = OriginalDocREModel(config, use_eager_attention(encoder), EMB, BLOCK, num_labels=3, **head_args)
    _, encoder2 = tiny_bert(tokenizer, len(rel2id), seed=1)
    ours = DocREModel(config, encoder2, EMB, BLOCK, num_labels=3, **head_args)
    ours.load_state_dict(original.state_dict(), strict=True)
    return original, ours


def inputs(features, labels=True):
    input_ids, attention_mask, label_lists, entity_pos, hts = docred.collate_fn(features)
    args = {"input_ids": input_ids, "attention_mask": attention_mask, "entity_pos": entity_pos, "hts": hts}
    return {**args, "labels": label_lists} if labels else args


@pytest.mark.parametrize("head_args", [
    {"loss": "ncrl"},
    {"loss": "ncrl", "gamma": 0.05, "symmetric": True},  # the NCRL authors' DocRED setting
    {"loss": "ncrl", "margin_reg": False},
    {"loss": "atl"},  # ATLOP's own loss
], ids=lambda a: "-".join(f"{k}={v}" for k, v in a.items()))
def test_forward_loss_and_gradients_match_original_atlop(corpus, head_args):
    features = corpus[3]
    original, ours = model_pair(corpus, **head_args)
    want_loss, want_pred = original(**inputs(features))
    loss, pred = ours(**inputs(features))
    torch.testing.assert_close(loss, want_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(pred, want_pred)
    assert pred.shape == (sum(len(f["hts"]) for f in features), len(corpus[2]))

    want_loss.backward()
    loss.backward()
    want_grads = dict(original.named_parameters())
    for name, param in ours.named_parameters():
        torch.testing.assert_close(param.grad, want_grads[name].grad, rtol=1e-4, atol=1e-6, msg=name)

    # Inference (no labels) returns ATLOP's 1-tuple and the same predictions.
    (pred_only,) = ours(**inputs(features, labels=False))
    assert torch.equal(pred_only, want_pred)


def test_atlop_checkpoint_loads_strictly(corpus, tmp_path):
    original, _ = model_pair(corpus)
    keys = set(original.state_dict())
    assert {"bilinear.weight", "bilinear.bias", "head_extractor.weight", "tail_extractor.bias"} <= keys
    assert all(k.startswith(("model.", "head_extractor.", "tail_extractor.", "bilinear.")) for k in keys)

    torch.save(original.state_dict(), tmp_path / "atlop.pt")
    _, tokenizer, rel2id, features = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id), seed=5)
    ours = DocREModel(config, encoder, EMB, BLOCK, num_labels=3, loss="atl")
    assert set(ours.state_dict()) == keys
    ours.load_state_dict(torch.load(tmp_path / "atlop.pt", weights_only=True), strict=True)
    ours.eval()
    original.eval()
    with torch.no_grad():
        assert torch.equal(ours(**inputs(features, labels=False))[0], original(**inputs(features, labels=False))[0])


def test_checkpoint_from_older_transformers_loads_strictly(corpus):
    """ATLOP checkpoints saved under transformers < 4.31 carry model.embeddings.position_ids, a
    buffer current transformers no longer saves: it is dropped and strict loading succeeds; a key
    that is really unknown is still rejected; the caller's dict is left as it was."""
    original, _ = model_pair(corpus)
    old_style = original.state_dict()
    assert "model.embeddings.position_ids" not in old_style
    old_style["model.embeddings.position_ids"] = torch.arange(original.config.max_position_embeddings)[None]
    _, tokenizer, rel2id, features = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id), seed=5)
    ours = DocREModel(config, encoder, EMB, BLOCK, num_labels=3, loss="atl")
    ours.load_state_dict(old_style, strict=True)
    assert "model.embeddings.position_ids" in old_style
    for name, value in original.state_dict().items():
        assert torch.equal(ours.state_dict()[name], value), name

    with pytest.raises(RuntimeError, match="model.embeddings.not_a_buffer"):
        ours.load_state_dict({**old_style, "model.embeddings.not_a_buffer": torch.zeros(1)}, strict=True)


def test_instance_mask_is_accepted_and_ignored(corpus):
    """ATLOP's and the NCRL authors' forward take instance_mask (and ignore it)."""
    features = corpus[3]
    _, ours = model_pair(corpus)
    loss, pred = ours(**inputs(features))
    pairs = sum(len(f["hts"]) for f in features)
    loss_masked, pred_masked = ours(**inputs(features), instance_mask=torch.zeros(pairs))
    assert torch.equal(loss_masked, loss) and torch.equal(pred_masked, pred)


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_presets_build_the_published_models(corpus, preset):
    _, tokenizer, rel2id, features = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id))
    model = DocREModel.from_preset(preset, config, encoder, EMB, BLOCK, num_labels=3)
    head = model.bilinear
    assert {"loss": head.loss, "gamma": head.gamma, "margin_reg": head.margin_reg,
            "symmetric": head.symmetric} == PRESETS[preset]["model"]
    want = {"atlop": ("atl", False), "ncrl-docred": ("ncrl", True)}[preset]
    assert (head.loss, head.symmetric) == want
    # The preset's model is the original's with the same settings.
    original = OriginalDocREModel(config, use_eager_attention(tiny_bert(tokenizer, len(rel2id), seed=1)[1]), EMB,
                                  BLOCK, num_labels=3, **PRESETS[preset]["model"])
    original.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(model(**inputs(features))[0], original(**inputs(features))[0], rtol=1e-5, atol=1e-6)

    assert DocREModel.from_preset(preset, config, encoder, EMB, BLOCK, gamma=0.01).bilinear.gamma == 0.01
    with pytest.raises(ValueError, match="preset must be one of"):
        DocREModel.from_preset("ncrl", config, encoder)


@pytest.mark.parametrize("loss", ["ncrl", "bce"])
def test_pair_scores_give_the_predictions_and_the_ncre(corpus, loss):
    """pair_scores + predict is what forward returns; for BCE column 0 holds its global threshold
    0, so NCRE measures the ranking the prediction uses."""
    features = corpus[3]
    _, ours = model_pair(corpus, loss=loss)
    ours.eval()
    with torch.no_grad():
        scores = ours.pair_scores(**inputs(features, labels=False))
        (pred,) = ours(**inputs(features, labels=False))
    assert torch.equal(ours.predict(scores), pred)
    if loss == "bce":
        assert scores[:, 0].abs().max() == 0
    labels = torch.cat([torch.tensor(f["labels"]) for f in features]).float()
    ours.num_labels = -1  # without the top-k limit, NCRE = 0 exactly on the predicted labels
    assert ncre(scores, ours.predict(scores), reduction="sum") == 0
    assert 0 <= ncre(scores, labels) <= len(corpus[2]) - 1


def test_encoder_with_default_attention_gives_attention_weights(corpus):
    """transformers 5 builds BERT with SDPA, which computes no attention weights; DocREModel
    switches it to eager attention (older versions fall back to eager on output_attentions)."""
    _, tokenizer, rel2id, features = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id))
    assert encoder.config._attn_implementation != "eager"
    model = DocREModel(config, encoder, EMB, BLOCK)
    sequence_output, attention = model.encode(*docred.collate_fn(features)[:2])
    assert attention.shape == (len(features), 2, sequence_output.shape[1], sequence_output.shape[1])
    for i, n in enumerate(len(f["input_ids"]) for f in features):
        # Softmax rows over the document's tokens, nothing on its padding.
        torch.testing.assert_close(attention[i, :, :n, :n].sum(-1), torch.ones(2, n))
        assert attention[i, :, :n, n:].abs().sum() < 1e-6


class NoAttentionWeights(torch.nn.Module):
    """An encoder whose attention kernel computes no weights (as SDPA or flash attention)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder, self.config = encoder, encoder.config

    def forward(self, **kwargs):
        hidden = self.encoder(**kwargs).last_hidden_state
        return transformers.modeling_outputs.BaseModelOutput(last_hidden_state=hidden, attentions=())


def test_encoder_without_attention_weights_raises_a_clear_error(corpus):
    _, tokenizer, rel2id, features = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id))
    model = DocREModel(config, NoAttentionWeights(encoder), EMB, BLOCK)
    with pytest.raises(RuntimeError, match="attn_implementation='eager'"):
        model(**inputs(features))


def test_config_needs_atlop_attributes(corpus):
    _, tokenizer, rel2id, _ = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id))
    del config.transformer_type
    with pytest.raises(ValueError, match="config.transformer_type"):
        DocREModel(config, encoder, EMB, BLOCK)
    config.transformer_type = "roberta"
    config.cls_token_id = None
    with pytest.raises(ValueError, match="config.cls_token_id"):
        DocREModel(config, encoder, EMB, BLOCK)


def test_config_without_num_labels_fails_naming_it(corpus):
    """transformers configs default num_labels to 2, so a forgotten one builds a 2-class head; the
    labels' width gives it away at the first forward with labels."""
    _, tokenizer, rel2id, features = corpus
    config, encoder = tiny_bert(tokenizer, len(rel2id))
    config.num_labels = transformers.BertConfig().num_labels  # as if never set
    assert config.num_labels == 2
    model = DocREModel(config, encoder, EMB, BLOCK)
    with pytest.raises(ValueError, match=rf"rows of 2 classes \(the model's config.num_labels\), got shape "
                                         rf"\[\d+, {len(rel2id)}\]; set config.num_labels"):
        model(**inputs(features))


@pytest.mark.parametrize("end_count", [1, 2], ids=["bert", "roberta"])
def test_long_documents_use_two_overlapping_windows(corpus, end_count):
    """A 700-token document next to a 100-token one, checked against ATLOP's definition: window 1
    = its first 512 - len(end_tokens) tokens + the end tokens ([SEP], or </s></s> for RoBERTa),
    window 2 = [CLS] + its last 511 tokens; hidden states averaged where both windows see a
    position, attention of both added and rows renormalised."""
    _, tokenizer, rel2id, _ = corpus
    _, encoder = tiny_bert(tokenizer, len(rel2id), max_position_embeddings=WINDOW)
    encoder = use_eager_attention(encoder).eval()
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    g = torch.Generator().manual_seed(0)
    long_len, short_len = 700, 100
    ids = torch.zeros(2, long_len, dtype=torch.long)
    ids[0] = torch.randint(5, len(tokenizer), (long_len,), generator=g)
    ids[0, 0], ids[0, -1] = cls, sep
    ids[1, :short_len] = torch.randint(5, len(tokenizer), (short_len,), generator=g)
    ids[1, 0], ids[1, short_len - 1] = cls, sep
    mask = torch.zeros(2, long_len)
    mask[0], mask[1, :short_len] = 1.0, 1.0

    with torch.no_grad():
        hidden, attention = process_long_input(encoder, ids, mask, [cls], [sep] * end_count)

        def encode(window_ids):
            out = encoder(input_ids=window_ids[None], output_attentions=True)
            return out.last_hidden_state[0], out.attentions[-1][0]

        head_end = WINDOW - end_count  # document positions [0, head_end) come from window 1
        hidden1, att1 = encode(torch.cat([ids[0, :head_end], torch.tensor([sep] * end_count)]))
        hidden2, att2 = encode(torch.cat([torch.tensor([cls]), ids[0, long_len - WINDOW + 1:]]))
        short_hidden, short_att = encode(ids[1, :short_len])

    tail_start = long_len - WINDOW + 1  # first document position window 2 keeps (189)
    assert hidden.shape == (2, long_len, 16) and attention.shape == (2, 2, long_len, long_len)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    # Positions only window 1 sees, both see, only window 2 sees.
    torch.testing.assert_close(hidden[0, :tail_start], hidden1[:tail_start], **tol)
    torch.testing.assert_close(hidden[0, tail_start:head_end],
                               (hidden1[tail_start:head_end] + hidden2[1:head_end - tail_start + 1]) / 2, **tol)
    torch.testing.assert_close(hidden[0, head_end:], hidden2[head_end - tail_start + 1:], **tol)
    # Attention: a row only window 1 sees is its window-1 row without the end tokens, renormalised.
    row = att1[:, 5, :head_end]
    torch.testing.assert_close(attention[0, :, 5, :head_end], row / row.sum(-1, keepdim=True), **tol)
    assert attention[0, :, 5, head_end:].abs().max() == 0
    # A row both windows see adds the two rows at their document positions.
    p = 300
    both = torch.zeros(2, long_len)
    both[:, :head_end] += att1[:, p, :head_end]
    both[:, tail_start:] += att2[:, p - tail_start + 1, 1:]
    torch.testing.assert_close(attention[0, :, p], both / both.sum(-1, keepdim=True), **tol)
    torch.testing.assert_close(attention[0].sum(-1), torch.ones(2, long_len), **tol)
    # The short document in the same batch is encoded as on its own, zero-padded to 700.
    torch.testing.assert_close(hidden[1, :short_len], short_hidden, **tol)
    torch.testing.assert_close(attention[1, :, :short_len, :short_len], short_att, **tol)
    assert hidden[1, WINDOW:].abs().max() == 0 and attention[1, :, :, WINDOW:].abs().max() == 0


def test_long_document_trains_end_to_end(corpus):
    """DocREModel on a document past 512 word pieces, entities mentioned in both windows and one
    beyond max_seq_length (ATLOP gives it a zero embedding): finite loss, gradients everywhere."""
    _, tokenizer, rel2id, _ = corpus
    filler = ["The", "records", "were", "lost", "."]
    sents = ([["Kalo", "Ren", "married", "Su", "Dor", "."]] + [filler] * 100 + [["Kalo", "Ren", "met", "Su", "Dor", "."]]
             + [filler] * 50 + [["Visit", "Tarvo", "."]])
    doc = {"title": "long", "sents": sents, "vertexSet": [
        [{"name": "Kalo Ren", "sent_id": 0, "pos": [0, 2], "type": "PER"},
         {"name": "Kalo Ren", "sent_id": 101, "pos": [0, 2], "type": "PER"}],
        [{"name": "Su Dor", "sent_id": 0, "pos": [3, 5], "type": "PER"},
         {"name": "Su Dor", "sent_id": 101, "pos": [3, 5], "type": "PER"}],
        [{"name": "Tarvo", "sent_id": 152, "pos": [1, 2], "type": "LOC"}],
    ], "labels": [{"h": 0, "t": 1, "r": "P26", "evidence": [0]}, {"h": 1, "t": 0, "r": "P26", "evidence": [0]}]}
    (feature,) = docred.read_docred([doc], tokenizer, rel2id, max_seq_length=760)
    assert len(feature["input_ids"]) == 760
    (first, second), _, (cut,) = feature["entity_pos"]
    assert first[0] + 1 < 760 - WINDOW + 1 and WINDOW - 1 <= second[0] + 1 < 760  # window 1 only, window 2 only
    assert cut[0] + 1 >= 760  # past max_seq_length: ATLOP's zero-embedding path
    config, encoder = tiny_bert(tokenizer, len(rel2id), max_position_embeddings=WINDOW)
    model = DocREModel(config, encoder, EMB, BLOCK, num_labels=3, gamma=0.05)
    loss, pred = model(**inputs([feature]))
    assert torch.isfinite(loss) and pred.shape == (6, len(rel2id))
    loss.backward()
    for name, param in model.named_parameters():
        if not name.startswith("model.pooler."):  # BERT's pooler is not used by ATLOP
            assert param.grad is not None and torch.isfinite(param.grad).all(), name
    assert model.model.embeddings.word_embeddings.weight.grad.abs().sum() > 0


def test_documents_without_pairs(corpus):
    """A one-entity document has no pairs (as a DDP rank may have): it adds no rows and no loss."""
    docs, tokenizer, rel2id, features = corpus
    single = dict(docs[0], title="single", vertexSet=docs[0]["vertexSet"][:1], labels=[])
    (lonely,) = docred.read_docred([single], tokenizer, rel2id)
    assert lonely["hts"] == [] and lonely["labels"] == []
    _, ours = model_pair(corpus)
    loss_alone, pred_alone = ours(**inputs([lonely]))
    assert loss_alone.item() == 0.0 and pred_alone.shape == (0, len(rel2id))
    loss_alone.backward()
    assert ours.bilinear.weight.grad.abs().max() == 0

    loss_with, pred_with = ours(**inputs([features[0], lonely]))
    loss_without, pred_without = ours(**inputs([features[0]]))
    torch.testing.assert_close(loss_with, loss_without)
    assert torch.equal(pred_with, pred_without)


@pytest.mark.parametrize("bad", [-1, "count"], ids=["negative", "past-the-end"])
def test_pair_indices_outside_their_document_are_refused(corpus, bad):
    """The batch's entities are pooled together, so a pair index outside its own document would
    silently read another document's entity: it is refused, naming hts."""
    features = corpus[3][:2]
    _, ours = model_pair(corpus)
    args = inputs(features, labels=False)
    entities = len(args["entity_pos"][1])
    args["hts"] = [list(args["hts"][0]), [[0, entities if bad == "count" else bad]] + list(args["hts"][1])[1:]]
    with pytest.raises(ValueError, match=r"hts\[1\] holds entity indices outside"):
        ours(**args)


def test_bce_predictions_threshold_at_probability_one_half(corpus):
    _, ours = model_pair(corpus, loss="bce")
    ours.num_labels = -1
    captured = []
    ours.bilinear.register_forward_hook(lambda module, args, logits: captured.append(logits))
    with torch.no_grad():
        (pred,) = ours(**inputs(corpus[3], labels=False))
    want = (captured[0][:, 1:] > 0).float()
    assert torch.equal(pred[:, 1:], want)
    assert torch.equal(pred[:, 0], (want.sum(1) == 0).float())
