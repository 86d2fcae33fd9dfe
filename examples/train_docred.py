"""Train ATLOP's DocREModel with the fused NCRL head + loss and report the official DocRED metrics.

Offline by default: a synthetic DocRED-format corpus (ncrl_kernels.docred.synthetic_docs), a
WordPiece tokenizer trained on it and a small randomly initialised BERT; nothing is downloaded.

    python examples/train_docred.py                      # synthetic, CPU, a few minutes
    python examples/train_docred.py --train train_annotated.json --dev dev.json \\
        --model /path/to/bert-base-cased --rel2id meta/rel2id.json --epochs 30 \\
        --lr 5e-5 --head-lr 1e-4 --emb-size 768 --block-size 64 --gamma 0.05

Prints dev F1 / Ign F1 (percent) after every epoch and ends with one JSON line
``{"dev_f1": ..., "dev_ign_f1": ...}`` (fractions, last epoch).
"""
import argparse
import json
import random
import time

import torch
from torch.utils.data import DataLoader
from tqdm import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel, get_linear_schedule_with_warmup

from ncrl_kernels import docred
from ncrl_kernels.atlop import DocREModel


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    data = parser.add_argument_group("data (synthetic unless --train/--dev are given)")
    data.add_argument("--train", help="DocRED training file (e.g. train_annotated.json)")
    data.add_argument("--dev", help="DocRED dev file, scored with F1 and Ign F1 against --train")
    data.add_argument("--rel2id",
                      help="relation -> id JSON (DocRED's meta/rel2id.json); default: built from the train and dev labels")
    data.add_argument("--max-seq-length", type=int, default=1024)
    data.add_argument("--train-docs", type=int, default=1500, help="synthetic training documents")
    data.add_argument("--dev-docs", type=int, default=200, help="synthetic dev documents")
    encoder = parser.add_argument_group("encoder (a small random BERT unless --model is given)")
    encoder.add_argument("--model", help="local directory of a pretrained BERT/RoBERTa and its tokenizer")
    encoder.add_argument("--transformer-type", choices=["bert", "roberta"],
                         help="ATLOP's transformer_type; default: the model's model_type")
    encoder.add_argument("--hidden-size", type=int, default=128)
    encoder.add_argument("--layers", type=int, default=2)
    encoder.add_argument("--heads", type=int, default=4)
    encoder.add_argument("--vocab-size", type=int, default=2000, help="of the synthetic corpus' WordPiece tokenizer")
    head = parser.add_argument_group("head and loss")
    head.add_argument("--emb-size", type=int, default=256)
    head.add_argument("--block-size", type=int, default=32)
    head.add_argument("--loss", choices=["ncrl", "atl", "bce"], default="ncrl")
    head.add_argument("--gamma", type=float, default=0.0, help="NCRL margin shift (the NCRL authors use 0.05)")
    head.add_argument("--num-labels", type=int, default=4, help="at most this many relations per pair (-1: any)")
    train = parser.add_argument_group("training")
    train.add_argument("--epochs", type=int, default=10)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--test-batch-size", type=int, default=32)
    train.add_argument("--lr", type=float, default=1e-3, help="encoder learning rate")
    train.add_argument("--head-lr", type=float, default=1e-3, help="extractors' and bilinear's learning rate")
    train.add_argument("--warmup-ratio", type=float, default=0.06)
    train.add_argument("--max-grad-norm", type=float, default=1.0)
    train.add_argument("--seed", type=int, default=66)
    train.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads; 1 because with 2 a step of the default model took 10x longer "
                            "when other jobs shared the 2 cores (more may help on an idle machine)")
    train.add_argument("--save", help="write the trained model's state dict here")
    return parser.parse_args(argv)


def load_data(args):
    """(train_docs, dev_docs, tokenizer, encoder, rel2id)."""
    if bool(args.train) != bool(args.dev):
        raise SystemExit("--train and --dev go together")
    if args.train:
        train_docs, dev_docs = docred.load_json(args.train), docred.load_json(args.dev)
    else:
        train_docs = docred.synthetic_docs(args.train_docs, seed=args.seed, title_prefix="train")
        dev_docs = docred.synthetic_docs(args.dev_docs, seed=args.seed + 1, title_prefix="dev")
    rel2id = docred.load_json(args.rel2id) if args.rel2id else docred.build_rel2id(train_docs, dev_docs)

    if args.model:
        tokenizer = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        config = AutoConfig.from_pretrained(args.model, num_labels=len(rel2id), local_files_only=True)
        encoder = AutoModel.from_pretrained(args.model, config=config, attn_implementation="eager",
                                            local_files_only=True)
    else:
        tokenizer = docred.wordpiece_tokenizer(train_docs, vocab_size=args.vocab_size)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=args.hidden_size, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, intermediate_size=4 * args.hidden_size,
                            pad_token_id=tokenizer.pad_token_id, num_labels=len(rel2id))
        encoder = BertModel(config)
    # ATLOP's extra config attributes, on the encoder's own config (from_pretrained copies the one passed in).
    config = encoder.config
    config.transformer_type = args.transformer_type or config.model_type
    config.cls_token_id, config.sep_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return train_docs, dev_docs, tokenizer, encoder, rel2id


def predict(model, features, batch_size):
    model.eval()
    preds = []
    with torch.no_grad():
        for input_ids, attention_mask, _, entity_pos, hts in DataLoader(features, batch_size=batch_size,
                                                                        collate_fn=docred.collate_fn):
            preds.append(model(input_ids, attention_mask, entity_pos=entity_pos, hts=hts)[0])
    return torch.cat(preds)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    train_docs, dev_docs, tokenizer, encoder, rel2id = load_data(args)
    train_features = docred.read_docred(train_docs, tokenizer, rel2id, args.max_seq_length)
    dev_features = docred.read_docred(dev_docs, tokenizer, rel2id, args.max_seq_length)
    model = DocREModel(encoder.config, encoder, args.emb_size, args.block_size, args.num_labels, loss=args.loss,
                       gamma=args.gamma)
    print(f"{len(train_features)} train / {len(dev_features)} dev documents, {len(rel2id)} classes, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, loss={args.loss}, gamma={args.gamma}")

    # ATLOP's optimiser: the new layers (extractors, bilinear) get their own learning rate.
    new_layers = ("extractor", "bilinear")
    groups = [
        {"params": [p for n, p in model.named_parameters() if not any(k in n for k in new_layers)], "lr": args.lr},
        {"params": [p for n, p in model.named_parameters() if any(k in n for k in new_layers)], "lr": args.head_lr},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, eps=1e-6)
    loader = DataLoader(train_features, batch_size=args.batch_size, shuffle=True, collate_fn=docred.collate_fn,
                        drop_last=True)
    total_steps = len(loader) * args.epochs
    scheduler = get_linear_schedule_with_warmup(optimizer, int(total_steps * args.warmup_ratio), total_steps)

    scores = {}
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        losses = []
        for input_ids, attention_mask, labels, entity_pos, hts in tqdm(loader, desc=f"epoch {epoch + 1}",
                                                                       leave=False):
            loss = model(input_ids, attention_mask, labels=labels, entity_pos=entity_pos, hts=hts)[0]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        answers = docred.to_official(predict(model, dev_features, args.test_batch_size), dev_features, rel2id)
        scores = docred.evaluate(answers, dev_docs, train_docs)
        print(f"epoch {epoch + 1}/{args.epochs}: train loss {sum(losses) / len(losses):.4f}  "
              f"dev F1 {100 * scores['f1']:.2f}  Ign F1 {100 * scores['ign_f1']:.2f}  "
              f"(P {100 * scores['precision']:.2f}, R {100 * scores['recall']:.2f})  "
              f"{time.perf_counter() - start:.0f}s", flush=True)
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(json.dumps({"dev_f1": scores["f1"], "dev_ign_f1": scores["ign_f1"]}))


if __name__ == "__main__":
    main()
