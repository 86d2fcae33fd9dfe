"""The oracle for ncrl_kernels.atlop: ATLOP's original DocREModel (wzhouad/ATLOP model.py),
re-implemented here the way the original computes it, unfused.

Same submodules and parameter names as the original (``model``, ``head_extractor``,
``tail_extractor``, ``bilinear = nn.Linear(emb_size * block_size, num_classes)``; the loss has no
parameters), so its ``state_dict()`` is an ATLOP checkpoint. It builds the ``[pairs, E*B]``
group-bilinear feature and applies the reference loss and ``get_label`` of ncrl_kernels.reference
to ``logits.float()`` as ATLOP does. Short documents only (one window): the long-input scheme is
tested against its own definition in test_atlop.py.
"""
import torch
from torch import nn

from ncrl_kernels import reference


class OriginalDocREModel(nn.Module):
    def __init__(self, config, model, emb_size=768, block_size=64, num_labels=-1, *, loss="atl", gamma=0.0,
                 margin_reg=True, symmetric=False):
        super().__init__()
        self.config = config
        self.model = model
        self.hidden_size = config.hidden_size
        self.head_extractor = nn.Linear(2 * config.hidden_size, emb_size)
        self.tail_extractor = nn.Linear(2 * config.hidden_size, emb_size)
        self.bilinear = nn.Linear(emb_size * block_size, config.num_labels)
        self.emb_size, self.block_size, self.num_labels = emb_size, block_size, num_labels
        self.loss, self.gamma, self.margin_reg, self.symmetric = loss, gamma, margin_reg, symmetric

    def get_hrt(self, sequence_output, attention, entity_pos, hts):
        offset = 1  # [CLS]
        n, h, _, c = attention.size()
        hss, tss, rss = [], [], []
        for i in range(len(entity_pos)):
            entity_embs, entity_atts = [], []
            for e in entity_pos[i]:
                if len(e) > 1:
                    e_emb, e_att = [], []
                    for start, end in e:
                        if start + offset < c:
                            e_emb.append(sequence_output[i, start + offset])
                            e_att.append(attention[i, :, start + offset])
                    if len(e_emb) > 0:
                        e_emb = torch.logsumexp(torch.stack(e_emb, dim=0), dim=0)
                        e_att = torch.stack(e_att, dim=0).mean(0)
                    else:
                        e_emb = torch.zeros(self.config.hidden_size).to(sequence_output)
                        e_att = torch.zeros(h, c).to(attention)
                else:
                    start, end = e[0]
                    if start + offset < c:
                        e_emb = sequence_output[i, start + offset]
                        e_att = attention[i, :, start + offset]
                    else:
                        e_emb = torch.zeros(self.config.hidden_size).to(sequence_output)
                        e_att = torch.zeros(h, c).to(attention)
                entity_embs.append(e_emb)
                entity_atts.append(e_att)
            entity_embs = torch.stack(entity_embs, dim=0)
            entity_atts = torch.stack(entity_atts, dim=0)
            ht_i = torch.LongTensor(hts[i]).to(sequence_output.device)
            hs = torch.index_select(entity_embs, 0, ht_i[:, 0])
            ts = torch.index_select(entity_embs, 0, ht_i[:, 1])
            h_att = torch.index_select(entity_atts, 0, ht_i[:, 0])
            t_att = torch.index_select(entity_atts, 0, ht_i[:, 1])
            ht_att = (h_att * t_att).mean(1)
            ht_att = ht_att / (ht_att.sum(1, keepdim=True) + 1e-5)
            rs = torch.einsum("ld,rl->rd", sequence_output[i], ht_att)
            hss.append(hs)
            tss.append(ts)
            rss.append(rs)
        return torch.cat(hss, dim=0), torch.cat(rss, dim=0), torch.cat(tss, dim=0)

    def forward(self, input_ids=None, attention_mask=None, labels=None, entity_pos=None, hts=None):
        assert input_ids.shape[1] <= 512, "the oracle encodes single windows only"
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, output_attentions=True)
        sequence_output, attention = output[0], output.attentions[-1]
        hs, rs, ts = self.get_hrt(sequence_output, attention, entity_pos, hts)
        hs = torch.tanh(self.head_extractor(torch.cat([hs, rs], dim=1)))
        ts = torch.tanh(self.tail_extractor(torch.cat([ts, rs], dim=1)))
        b1 = hs.view(-1, self.emb_size // self.block_size, self.block_size)
        b2 = ts.view(-1, self.emb_size // self.block_size, self.block_size)
        bl = b1.unsqueeze(3) * b2.unsqueeze(2)
        if self.symmetric:  # the NCRL authors' DocRED model
            bl = torch.max(bl, torch.transpose(bl, 2, 3))
        logits = self.bilinear(bl.view(-1, self.emb_size * self.block_size))

        output = (reference.predict(logits, self.num_labels),)
        if labels is not None:
            labels = torch.cat([torch.tensor(label) for label in labels], dim=0).to(logits)
            loss = reference.loss_fn(logits.float(), labels.float(), self.loss, self.gamma, self.margin_reg)
            output = (loss.to(sequence_output),) + output
        return output
