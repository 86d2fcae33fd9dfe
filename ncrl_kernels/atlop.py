"""ATLOP's document-level relation extraction model with the head and loss fused.

:class:`DocREModel` is a drop-in for ``DocREModel`` of wzhouad/ATLOP's model.py: same constructor,
parameter names (``model.*``, ``head_extractor``, ``tail_extractor``, ``bilinear``), forward
arguments and outputs, so ATLOP (and NCRL) checkpoints load with ``strict=True``. The difference is
the last step: ATLOP builds the ``[pairs, emb_size * block_size]`` group-bilinear feature and calls
its loss on the logits; here :func:`ncrl_kernels.fused_ncrl` computes head and loss without that
feature, with the NCRL loss by default (``loss="atl"`` gives ATLOP's own loss).

Needs ``transformers`` (``pip install ncrl_kernels[atlop]``) only for the encoder you pass in.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from . import docred, functional, reference
from .modules import GroupBilinearLoss

# BERT/RoBERTa see at most 512 positions; ATLOP encodes longer documents in two overlapping windows.
WINDOW = 512

__all__ = ["DocREModel", "PRESETS", "process_long_input", "use_eager_attention"]

# The two published DocRED setups. One table for both users: DocREModel.from_preset takes "model"
# (head and loss), the training CLI (ncrl_kernels.train_docred) takes both parts, so the class and
# the CLI cannot drift apart. Values from the authors' code; docs/atlop.md ("Presets") says where
# the NCRL paper's Table 7 differs from the authors' scripts.
PRESETS = {
    # wzhouad/ATLOP (model.py, train.py, scripts/run_bert.sh): adaptive thresholding loss, plain
    # group-bilinear feature; the new layers (names with "extractor" or "bilinear") at lr 1e-4
    # without weight decay; 30 epochs, no accumulation, 6% warmup. (gamma and margin_reg are NCRL's
    # and unused by ATL; every preset sets every key so the CLI can take its values from either.)
    "atlop": {
        "model": {"loss": "atl", "gamma": 0.0, "margin_reg": True, "symmetric": False},
        "training": {"classifier_lr": 1e-4, "classifier_weight_decay": 0.0, "gradient_accumulation_steps": 1,
                     "num_train_epochs": 30.0, "warmup_ratio": 0.06},
    },
    # yangzhou12/NCRL's DocRED code (commit bce70d4): NCRLoss(clip=0.05), i.e. NCRL with margin
    # shift 0.05 and the margin regulariser, the symmetric feature max(bl, bl^T); weight decay 0.01
    # on the new layers' parameter group only; its run scripts' 8 epochs, accumulation 2, 6% warmup.
    "ncrl-docred": {
        "model": {"loss": "ncrl", "gamma": 0.05, "margin_reg": True, "symmetric": True},
        "training": {"classifier_lr": 1e-4, "classifier_weight_decay": 0.01, "gradient_accumulation_steps": 2,
                     "num_train_epochs": 8.0, "warmup_ratio": 0.06},
    },
}


def use_eager_attention(model):
    """Switch a ``transformers`` encoder to the eager attention implementation, in place.

    Localised context pooling reads the last layer's attention weights; the SDPA and flash kernels
    that current ``transformers`` picks by default compute none (``output_attentions=True`` then
    returns an empty tuple). Loading with ``attn_implementation="eager"`` does the same up front.
    """
    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", "eager") != "eager" and hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation("eager")
    return model


def _encode(model, input_ids, attention_mask):
    """Last hidden states ``[n, len, hidden]`` and last-layer attention ``[n, heads, len, len]``."""
    output = model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True, return_dict=True)
    attentions = output.attentions
    if not attentions or attentions[-1] is None:
        implementation = getattr(getattr(model, "config", None), "_attn_implementation", "unknown")
        raise RuntimeError(
            f"the encoder returned no attention weights (attention implementation {implementation!r}); "
            "ATLOP's context pooling needs them: load it with attn_implementation='eager' or call "
            "ncrl_kernels.atlop.use_eager_attention(model)"
        )
    return output.last_hidden_state, attentions[-1]


def process_long_input(model, input_ids, attention_mask, start_tokens, end_tokens):
    """ATLOP's long_seq.process_long_input: encode ``[n, c]`` token ids, ``c`` beyond 512 included.

    A document of up to 512 tokens is encoded as it is. A longer one (length ``l``) is encoded as
    two windows: its first ``512 - len(end_tokens)`` tokens closed by ``end_tokens``, and
    ``start_tokens`` followed by its last ``512 - len(start_tokens)`` tokens. Hidden states are
    averaged where the windows overlap; each window's attention is placed at its positions, the
    two are added and every row is renormalised to sum to 1.

    Returns ``(sequence_output [n, c, hidden], attention [n, heads, c, c])``.
    """
    n, c = input_ids.shape
    if c <= WINDOW:
        return _encode(model, input_ids, attention_mask)
    start = torch.tensor(start_tokens).to(input_ids)
    end = torch.tensor(end_tokens).to(input_ids)
    len_start, len_end = len(start_tokens), len(end_tokens)
    lengths = attention_mask.sum(1).int().tolist()

    window_ids, window_masks, windows_per_doc = [], [], []
    for i, length in enumerate(lengths):
        if length <= WINDOW:
            window_ids.append(input_ids[i, :WINDOW])
            window_masks.append(attention_mask[i, :WINDOW])
            windows_per_doc.append(1)
        else:
            window_ids += [torch.cat([input_ids[i, :WINDOW - len_end], end]),
                           torch.cat([start, input_ids[i, length - WINDOW + len_start:length]])]
            window_masks += [attention_mask[i, :WINDOW], attention_mask[i, length - WINDOW:length]]
            windows_per_doc.append(2)
    window_masks = torch.stack(window_masks)
    hidden, attention = _encode(model, torch.stack(window_ids), window_masks)

    doc_hidden, doc_attention = [], []
    row = 0
    for count, length in zip(windows_per_doc, lengths):
        if count == 1:
            doc_hidden.append(F.pad(hidden[row], (0, 0, 0, c - WINDOW)))
            doc_attention.append(F.pad(attention[row], (0, c - WINDOW, 0, c - WINDOW)))
        else:
            # Window 1 keeps document positions [0, head_end) (its end tokens dropped); window 2
            # keeps [tail_start, length) (its start tokens dropped).
            head_end, tail_start = WINDOW - len_end, length - WINDOW + len_start
            hidden1 = F.pad(hidden[row, :head_end], (0, 0, 0, c - head_end))
            mask1 = F.pad(window_masks[row, :head_end], (0, c - head_end))
            attention1 = F.pad(attention[row, :, :head_end, :head_end], (0, c - head_end, 0, c - head_end))
            hidden2 = F.pad(hidden[row + 1, len_start:], (0, 0, tail_start, c - length))
            mask2 = F.pad(window_masks[row + 1, len_start:], (tail_start, c - length))
            attention2 = F.pad(attention[row + 1, :, len_start:, len_start:],
                               (tail_start, c - length, tail_start, c - length))
            overlap_count = mask1 + mask2 + 1e-10
            doc_hidden.append((hidden1 + hidden2) / overlap_count.unsqueeze(-1))
            summed = attention1 + attention2
            doc_attention.append(summed / (summed.sum(-1, keepdim=True) + 1e-10))
        row += count
    return torch.stack(doc_hidden), torch.stack(doc_attention)


class DocREModel(nn.Module):
    """ATLOP's DocREModel with ``bilinear`` + loss computed by :func:`ncrl_kernels.fused_ncrl`.

    Args:
        config: the encoder's ``transformers`` config, with ATLOP's extra attributes
            ``transformer_type`` ("bert" or "roberta"), ``cls_token_id`` and ``sep_token_id`` (set
            from the tokenizer, as ATLOP's train.py does) and ``num_labels`` = classes incl. "Na".
        model: the encoder (e.g. ``AutoModel.from_pretrained(...)``). It is switched to eager
            attention (:func:`use_eager_attention`) because context pooling needs attention weights.
        emb_size, block_size: ATLOP's extractor width and bilinear group size.
        num_labels: at most this many relations predicted per pair (-1: no limit), as in ATLOP.
        loss: "ncrl" (default), "atl" (ATLOP's loss) or "bce"; ``gamma`` (margin shift) and
            ``margin_reg`` apply to NCRL.
        symmetric: the NCRL authors' symmetric bilinear feature (their DocRED model).
        backend: the ``ncrl_kernels`` backend for the head and loss ("auto" picks the fastest).

    ``forward(input_ids, attention_mask, labels=None, entity_pos=None, hts=None, instance_mask=None)``
    returns ``(predictions,)``, or ``(loss, predictions)`` when ``labels`` (ATLOP's per-document
    lists of multi-hot rows) are given; predictions are float multi-hot ``[pairs, classes]``.
    ``instance_mask`` is accepted and ignored, as in ATLOP's and the NCRL authors' model.py.

    ``DocREModel.from_preset("atlop" | "ncrl-docred", config, model, ...)`` builds the published
    models (:data:`PRESETS`). ``load_state_dict`` accepts checkpoints saved under older
    ``transformers`` with ``strict=True``: encoder buffers that current ``transformers`` no longer
    saves (``model.embeddings.position_ids``) are dropped from the state dict before loading.
    """

    def __init__(self, config, model, emb_size=768, block_size=64, num_labels=-1, *, loss="ncrl", gamma=0.0,
                 margin_reg=True, symmetric=False, backend="auto"):
        super().__init__()
        self.special_tokens = _special_tokens(config)
        self.config = config
        self.model = use_eager_attention(model)
        self.hidden_size = config.hidden_size
        self.head_extractor = nn.Linear(2 * config.hidden_size, emb_size)
        self.tail_extractor = nn.Linear(2 * config.hidden_size, emb_size)
        self.bilinear = GroupBilinearLoss(emb_size, block_size, config.num_labels, symmetric=symmetric, loss=loss,
                                          gamma=gamma, margin_reg=margin_reg, backend=backend)
        self.emb_size = emb_size
        self.block_size = block_size
        self.num_labels = num_labels
        self.register_load_state_dict_pre_hook(_drop_unsaved_encoder_buffers)

    @classmethod
    def from_preset(cls, preset, config, model, emb_size=768, block_size=64, num_labels=-1, **overrides):
        """The model of a published setup (``PRESETS[preset]["model"]``: loss, gamma, margin_reg,
        symmetric); keyword ``overrides`` (any constructor keyword) win over the preset."""
        if preset not in PRESETS:
            raise ValueError(f"preset must be one of {sorted(PRESETS)}, got {preset!r}")
        return cls(config, model, emb_size, block_size, num_labels, **{**PRESETS[preset]["model"], **overrides})

    def encode(self, input_ids, attention_mask):
        start_tokens, end_tokens = self.special_tokens
        return process_long_input(self.model, input_ids, attention_mask, start_tokens, end_tokens)

    def get_hrt(self, sequence_output, attention, entity_pos, hts):
        """Head and tail entity embeddings (logsumexp over mentions, each read at its "*" marker)
        and the localised context ``rs`` of every pair (the document's hidden states weighted by
        the product of the head's and the tail's mean attention), all documents concatenated.

        ATLOP loops over entities and mentions, a few small GPU ops each, and its index tensors
        reach the GPU one entity at a time: thousands of ATen calls and hundreds of host-to-device
        copies per batch, which on a fast GPU cost more than the encoder. Here the entities of the
        whole batch are pooled at once, from indices built on the host and copied once: the
        embeddings' logsumexp over mentions padded per entity (the padding at -inf, as if absent),
        the attention rows' mean as one product per document with the mention counts at each
        position. The pairs, whose [pairs, heads, length] attention products are the large
        tensors, go one document at a time, as in ATLOP."""
        offset = len(self.special_tokens[0])  # entity_pos counts from the first word piece after [CLS]
        device, length = sequence_output.device, attention.shape[-1]
        # Mentions cut off by the maximum sequence length are skipped; an entity left without one
        # gets zeros, as in ATLOP.
        positions = [[start + offset for start, _ in mentions if start + offset < length]
                     for doc_entities in entity_pos for mentions in doc_entities]
        slots = max((len(p) for p in positions), default=0) or 1
        docs = [i for i, doc_entities in enumerate(entity_pos) for _ in doc_entities]
        index = torch.tensor([p + [0] * (slots - len(p)) for p in positions], dtype=torch.long).reshape(-1, slots)
        counts = torch.tensor([len(p) for p in positions], dtype=torch.long)
        # Each entity's mention positions as counts over the document's tokens, for the attention.
        rows = max((len(doc_entities) for doc_entities in entity_pos), default=0) or 1
        row = [e for doc_entities in entity_pos for e in range(len(doc_entities))]
        flat = [(i * rows + e) * length + position for i, e, p in zip(docs, row, positions) for position in p]
        at_position = torch.bincount(torch.tensor(flat, dtype=torch.long), minlength=len(entity_pos) * rows * length)
        at_position = at_position.view(-1, rows, length)
        index, counts, doc, row, at_position = (t.to(device) for t in (
            index, counts, torch.tensor(docs, dtype=torch.long), torch.tensor(row, dtype=torch.long), at_position))
        valid = torch.arange(slots, device=device) < counts[:, None]  # [entities, slots]

        mention_embs = sequence_output[doc[:, None], index]  # [entities, slots, hidden]
        # Entities without a mention take finite padding (their result is replaced by zeros, and a
        # logsumexp over -inf alone would send NaN back through the replacement's zero gradient).
        fill = torch.where(counts[:, None, None] > 0, float("-inf"), 0.0).to(mention_embs.dtype)
        entity_embs = torch.logsumexp(torch.where(valid[:, :, None], mention_embs, fill), dim=1)
        entity_embs = torch.where(counts[:, None] > 0, entity_embs, 0.0)
        # The mean of the mentions' attention rows, as one product per document: [docs, heads, rows,
        # length], then each entity's row. In the attention's dtype, as ATLOP's mean: autocast would
        # multiply in bf16/fp16.
        no_autocast = torch.autocast(device.type, enabled=False) if device.type in ("cpu", "cuda") else \
            contextlib.nullcontext()
        with no_autocast:
            sums = torch.matmul(at_position.to(attention.dtype)[:, None], attention)
        entity_atts = sums[doc, :, row] / counts.clamp(min=1)[:, None, None].to(attention.dtype)

        hss, rss, tss = [], [], []
        first = 0  # the document's first entity in the batch
        for i, doc_entities in enumerate(entity_pos):
            pairs = torch.as_tensor(hts[i], dtype=torch.long).reshape(-1, 2)
            if pairs.numel() and (pairs.min() < 0 or pairs.max() >= len(doc_entities)):
                raise ValueError(f"hts[{i}] holds entity indices outside [0, {len(doc_entities)}): each pair "
                                 "indexes its own document's entity_pos")
            pairs = (pairs + first).to(device)
            first += len(doc_entities)
            hss.append(entity_embs[pairs[:, 0]])
            tss.append(entity_embs[pairs[:, 1]])
            ht_att = (entity_atts[pairs[:, 0]] * entity_atts[pairs[:, 1]]).mean(1)
            ht_att = ht_att / (ht_att.sum(1, keepdim=True) + 1e-5)
            rss.append(ht_att @ sequence_output[i])
        if not hss:  # no documents
            return (sequence_output.new_zeros(0, sequence_output.shape[-1]),) * 3
        return torch.cat(hss), torch.cat(rss), torch.cat(tss)

    def pair_scores(self, input_ids, attention_mask, entity_pos, hts):
        """Class scores ``[pairs, classes]`` as the prediction compares them: the logits, whose
        column 0 (the none-class score) is each pair's threshold; with ``loss="bce"``, which learns
        no none-class score, column 0 is the global threshold 0 (probability 0.5). :meth:`predict`
        turns them into labels; :func:`ncrl_kernels.metrics.ncre` measures their ranking error."""
        hs, ts, _ = self._pair_representations(input_ids, attention_mask, entity_pos, hts)
        return self._with_threshold_column(self.bilinear(hs, ts))

    def predict(self, scores):
        """Multi-hot predictions ``[pairs, classes]`` from :meth:`pair_scores` (ATLOP's get_label)."""
        return functional.predict(scores, num_labels=self.num_labels)

    def forward(self, input_ids=None, attention_mask=None, labels=None, entity_pos=None, hts=None,
                instance_mask=None):
        # instance_mask: in ATLOP's signature; its train.py never passes it and its model ignores it.
        if labels is None:
            return (self.predict(self.pair_scores(input_ids, attention_mask, entity_pos, hts)),)
        hs, ts, sequence_output = self._pair_representations(input_ids, attention_mask, entity_pos, hts)
        labels = docred.pair_labels(labels, self.bilinear.num_classes).to(hs.device)
        # GroupBilinearLoss calls ncrl_kernels.fused_ncrl: head + loss without the [pairs, E*B] feature.
        loss, logits = self.bilinear(hs, ts, labels, return_logits=True)
        return loss.to(sequence_output), self.predict(self._with_threshold_column(logits))

    def _pair_representations(self, input_ids, attention_mask, entity_pos, hts):
        """ATLOP's head and tail representations ``hs``, ``ts`` (``[pairs, emb_size]``: entity
        embedding and localised context through the extractors and tanh), and the encoder output."""
        sequence_output, attention = self.encode(input_ids, attention_mask)
        hs, rs, ts = self.get_hrt(sequence_output, attention, entity_pos, hts)
        hs = torch.tanh(self.head_extractor(torch.cat([hs, rs], dim=1)))
        ts = torch.tanh(self.tail_extractor(torch.cat([ts, rs], dim=1)))
        return hs, ts, sequence_output

    def _with_threshold_column(self, logits):
        return reference.with_threshold(logits, 0.0) if self.bilinear.loss == "bce" else logits


def _drop_unsaved_encoder_buffers(module, state_dict, prefix, *_):
    """load_state_dict pre-hook: drop the encoder buffers that the encoder no longer saves.

    transformers >= 4.31 registers ``embeddings.position_ids`` (and ``token_type_ids``) as
    non-persistent buffers, so checkpoints from ATLOP's era carry a key that strict loading
    would reject. Their values are constants the encoder rebuilds itself (``arange``, zeros).
    ``state_dict`` is load_state_dict's own copy, so the caller's dict is not changed."""
    saved = module.model.state_dict().keys()
    for name, _ in module.model.named_buffers():
        if name not in saved:
            state_dict.pop(f"{prefix}model.{name}", None)


def _special_tokens(config):
    """ATLOP's (start_tokens, end_tokens) around a window: [CLS] ... [SEP] for BERT, <s> ... </s></s>
    for RoBERTa."""
    transformer_type = getattr(config, "transformer_type", None)
    if transformer_type not in ("bert", "roberta"):
        raise ValueError(f"config.transformer_type must be 'bert' or 'roberta', got {transformer_type!r}; set "
                         "config.transformer_type to the encoder's family, as ATLOP's train.py does (it picks the "
                         "tokens that close a long document's 512-token windows: [SEP] for 'bert', </s></s> for "
                         "'roberta')")
    ids = {name: getattr(config, name, None) for name in ("cls_token_id", "sep_token_id")}
    missing = [name for name, value in ids.items() if value is None]
    if missing:
        raise ValueError(f"config.{missing[0]} is not set; set config.cls_token_id = tokenizer.cls_token_id and "
                         "config.sep_token_id = tokenizer.sep_token_id, as ATLOP's train.py does")
    end = [ids["sep_token_id"]] * (1 if transformer_type == "bert" else 2)
    return [ids["cls_token_id"]], end
