"""Train and evaluate ATLOP's DocREModel, head and loss fused, with ATLOP's train.py flags.

    python -m ncrl_kernels.train_docred            # offline demo: synthetic corpus, small random BERT
    python -m ncrl_kernels.train_docred --data_dir ./dataset/docred --model_name_or_path bert-base-cased \\
        --train_file train_annotated.json --dev_file dev.json --test_file test.json ...   # ATLOP's run_bert.sh
    python -m ncrl_kernels.train_docred ... --preset ncrl-docred     # the NCRL authors' DocRED setup

ATLOP's flags keep their meanings and defaults (scripts/run_bert.sh and run_roberta.sh run with
only the script name changed); the additions are listed under "ncrl_kernels" in --help. The default
preset is "atlop" (ATLOP's loss and optimiser); the values of the presets are
ncrl_kernels.atlop.PRESETS, shared with DocREModel.from_preset. With none of the data flags
(--data_dir, --train_file, --dev_file, --test_file, --distant_file) the run is the offline demo on
ncrl_kernels.docred.synthetic_docs.

stdout carries one JSON line per evaluation (metrics as fractions; dev_ncre is the paper's None
Class Ranking Error per entity pair); progress bars and notes go to stderr. Under torchrun every
process trains on its DistributedSampler share and rank 0 evaluates and writes the files.
"""
import argparse
import contextlib
import datetime
import functools
import json
import math
import os
import random
import socket
import sys
import threading
import time
import traceback
import urllib.request
from urllib.parse import urlsplit

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler

try:
    from tqdm import tqdm
    from transformers import (AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel,
                              get_linear_schedule_with_warmup)
except ImportError as error:
    raise ImportError("ncrl_kernels.train_docred needs transformers and tqdm: pip install 'ncrl_kernels[atlop]'") \
        from error

from . import docred
from .atlop import PRESETS, DocREModel
from .metrics import ncre

# ATLOP's train.py defaults of the flags the parser leaves None: the data flags (so that a run
# without any can be told apart: the offline demo) and those the demo may set instead.
ATLOP_DEFAULTS = {
    "data_dir": "./dataset/docred",
    "model_name_or_path": "bert-base-cased",
    "train_file": "train_annotated.json",
    "dev_file": "dev.json",
    "test_file": "test.json",
    "train_batch_size": 4,
    "test_batch_size": 8,
    "learning_rate": 5e-5,
    "emb_size": 768,  # DocREModel's (and ATLOP's) defaults, which ATLOP's train.py never changes
    "block_size": 64,
}
# The offline demo (no data flag): a small random BERT needs far larger learning rates than a
# pretrained encoder and learns the synthetic corpus in 10 epochs. Where these and a preset both
# set a value (classifier_lr, num_train_epochs), these win: the presets' are for pretrained encoders.
SYNTHETIC_DEFAULTS = {
    "model_name_or_path": None,  # a small random BERT and a WordPiece tokenizer built from the corpus
    "learning_rate": 1e-3,
    "classifier_lr": 1e-3,
    "num_train_epochs": 10.0,
    "train_batch_size": 8,
    "test_batch_size": 32,
    "emb_size": 256,
    "block_size": 32,
    # One thread: with two, a step took 10x longer when other jobs shared the 2-core test machine.
    "threads": 1,
}
DATA_FLAGS = ("data_dir", "train_file", "dev_file", "test_file", "distant_file")
HEAD_LAYERS = ("extractor", "bilinear")  # ATLOP's new_layer: the parameter group at classifier_lr
AMP_DTYPES = {"off": None, "bf16": torch.bfloat16, "fp16": torch.float16}
HUB_PROBE_TIMEOUT_S = 5.0


def _defaults_note(name):
    """Help text naming where a flag's default comes from, read from the tables above."""
    parts = []
    if name in ATLOP_DEFAULTS:
        parts.append(f"ATLOP: {ATLOP_DEFAULTS[name]}")
    preset_values = {p: PRESETS[p]["training"].get(name, PRESETS[p]["model"].get(name)) for p in PRESETS}
    if any(v is not None for v in preset_values.values()):
        parts.append("presets: " + ", ".join(f"{p} {v}" for p, v in preset_values.items()))
    if SYNTHETIC_DEFAULTS.get(name) is not None:
        parts.append(f"offline demo: {SYNTHETIC_DEFAULTS[name]}")
    return f" (default: {'; '.join(parts)})"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m ncrl_kernels.train_docred",
                                     description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 1)[1])
    atlop = parser.add_argument_group("ATLOP's train.py flags")
    atlop.add_argument("--data_dir", help="directory of the DocRED files" + _defaults_note("data_dir"))
    atlop.add_argument("--transformer_type", default="bert", choices=["bert", "roberta"],
                       help="special tokens around a window: [CLS] .. [SEP] or <s> .. </s></s> (default: bert)")
    atlop.add_argument("--model_name_or_path",
                       help="local directory (save_pretrained layout) or hub id of the encoder; without it the "
                            "offline demo uses a small random BERT" + _defaults_note("model_name_or_path"))
    atlop.add_argument("--train_file", help="in --data_dir" + _defaults_note("train_file"))
    atlop.add_argument("--dev_file", help="in --data_dir; scored with F1, Ign F1, NCRE" + _defaults_note("dev_file"))
    atlop.add_argument("--test_file", help="in --data_dir; predicted into --result_file; '' for none"
                       + _defaults_note("test_file"))
    atlop.add_argument("--save_path", default="", help="write the best dev checkpoint (a state dict) here")
    atlop.add_argument("--load_path", default="",
                       help="no training: load this state dict (strict), evaluate dev, predict test into "
                            "--result_file; give the model flags it was trained with (--preset, --symmetric...): the "
                            "symmetric feature has no parameters, so a checkpoint loads under either and predicts "
                            "differently")
    atlop.add_argument("--config_name", default="", help="encoder config if not --model_name_or_path's")
    atlop.add_argument("--tokenizer_name", default="", help="tokenizer if not --model_name_or_path's")
    atlop.add_argument("--max_seq_length", type=int, default=1024, help="word pieces per document (default: 1024)")
    atlop.add_argument("--train_batch_size", type=int, help="documents per batch (per process under torchrun)"
                       + _defaults_note("train_batch_size"))
    atlop.add_argument("--test_batch_size", type=int, help="documents per evaluation batch"
                       + _defaults_note("test_batch_size"))
    atlop.add_argument("--gradient_accumulation_steps", type=int,
                       help="batches per optimiser step" + _defaults_note("gradient_accumulation_steps"))
    atlop.add_argument("--num_labels", type=int, default=4,
                       help="at most this many relations predicted per pair, -1 for no limit (default: 4)")
    atlop.add_argument("--learning_rate", type=float, help="encoder learning rate" + _defaults_note("learning_rate"))
    atlop.add_argument("--adam_epsilon", type=float, default=1e-6, help="AdamW epsilon (default: 1e-6)")
    atlop.add_argument("--max_grad_norm", type=float, default=1.0,
                       help="clip the gradient norm to this at every optimiser step, <= 0: no clipping (default: 1.0)")
    atlop.add_argument("--warmup_ratio", type=float,
                       help="share of the optimiser steps with linear warmup, then linear decay to 0"
                            + _defaults_note("warmup_ratio"))
    atlop.add_argument("--num_train_epochs", type=float, help="epochs on the annotated data (a whole number)"
                       + _defaults_note("num_train_epochs"))
    atlop.add_argument("--evaluation_steps", type=int, default=-1,
                       help="also evaluate every this many optimiser steps, <= 0: at the end of each epoch only "
                            "(default: -1)")
    atlop.add_argument("--seed", type=int, default=66, help="seeds initialisation, shuffling, dropout (default: 66)")
    atlop.add_argument("--num_class", type=int,
                       help="classes including 'Na' (ATLOP: 97); must equal the size of the relation ids, which "
                            "it defaults to")

    ours = parser.add_argument_group("ncrl_kernels")
    ours.add_argument("--preset", choices=sorted(PRESETS), default="atlop",
                      help="the published setup whose model and optimiser settings fill the flags not given: "
                           "atlop = ATLOP (ATL loss), ncrl-docred = the NCRL authors' DocRED code (default: atlop)")
    ours.add_argument("--loss", choices=["ncrl", "atl", "bce"], help="training loss" + _defaults_note("loss"))
    ours.add_argument("--gamma", type=float, help="NCRL's margin shift" + _defaults_note("gamma"))
    ours.add_argument("--no_margin_reg", dest="margin_reg", action="store_const", const=False,
                      help="NCRL without its margin regulariser (default: with it, in both presets)")
    ours.add_argument("--symmetric", dest="symmetric", action="store_const", const=True,
                      help="the NCRL authors' symmetric feature max(bl, bl^T)" + _defaults_note("symmetric"))
    ours.add_argument("--no_symmetric", dest="symmetric", action="store_const", const=False,
                      help="ATLOP's plain group-bilinear feature")
    ours.add_argument("--classifier_lr", type=float,
                      help="learning rate of the new layers (names with 'extractor' or 'bilinear')"
                           + _defaults_note("classifier_lr"))
    ours.add_argument("--classifier_weight_decay", type=float,
                      help="AdamW weight decay of the new layers' group (the encoder's is 0)"
                           + _defaults_note("classifier_weight_decay"))
    ours.add_argument("--emb_size", type=int, help="extractor width" + _defaults_note("emb_size"))
    ours.add_argument("--block_size", type=int, help="group size of the bilinear head" + _defaults_note("block_size"))
    ours.add_argument("--amp", choices=["auto", "off", "bf16", "fp16"], default="auto",
                      help="mixed precision with torch.autocast (fp16 with a GradScaler); auto = fp16 on a GPU, as "
                           "ATLOP's apex O1, off on the CPU; on a CPU bf16 is the one that helps, fp16 runs several "
                           "times slower (default: auto)")
    ours.add_argument("--rel2id", help="relation -> id JSON; default: meta/rel2id.json under the working directory "
                                       "(where ATLOP reads it) or under --data_dir, else built from the data")
    ours.add_argument("--distant_file", help="in --data_dir (e.g. train_distant.json): train on it first, then "
                                             "fine-tune on --train_file")
    ours.add_argument("--distant_epochs", type=float, default=1.0,
                      help="epochs on --distant_file (a whole number; default: 1)")
    ours.add_argument("--result_file", default="result.json",
                      help="test predictions in the CodaLab format (default: result.json, as ATLOP)")
    ours.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; offline demo: 1)")

    demo = parser.add_argument_group("offline demo (no data flag)")
    demo.add_argument("--synthetic_train_docs", type=int, default=1500, help="(default: 1500)")
    demo.add_argument("--synthetic_dev_docs", type=int, default=200, help="(default: 200)")
    demo.add_argument("--synthetic_test_docs", type=int, default=0, help="predicted into --result_file (default: 0)")
    demo.add_argument("--encoder_hidden_size", type=int, default=128, help="random BERT (default: 128)")
    demo.add_argument("--encoder_layers", type=int, default=2, help="random BERT (default: 2)")
    demo.add_argument("--encoder_heads", type=int, default=4, help="random BERT (default: 4)")
    demo.add_argument("--vocab_size", type=int, default=2000, help="of the demo's WordPiece tokenizer (default: 2000)")
    return parser


def parse_args(argv=None):
    """ATLOP's flags, then for every flag not given: the offline demo's value (no data flag),
    else the preset's, else ATLOP's default."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.data_flags = [f"--{name}" for name in DATA_FLAGS if getattr(args, name) is not None]
    args.synthetic = not args.data_flags
    if args.synthetic and args.model_name_or_path is not None:
        # Most likely a run script that lost its data flags: it would fine-tune that encoder on the
        # synthetic corpus at the demo's learning rates (1e-3), saying so only in one log line.
        flags = ", ".join("--" + flag for flag in DATA_FLAGS)
        parser.error(f"--model_name_or_path {args.model_name_or_path} without a data flag ({flags}) would run the "
                     "offline demo on a synthetic corpus; give --data_dir (and --train_file, --dev_file...) to "
                     "train on DocRED, or leave out --model_name_or_path for the demo")
    layers = ([SYNTHETIC_DEFAULTS] if args.synthetic else []) + [
        PRESETS[args.preset]["model"], PRESETS[args.preset]["training"], ATLOP_DEFAULTS]
    for name in {key for layer in layers for key in layer}:
        if getattr(args, name, None) is None:
            setattr(args, name, next(layer[name] for layer in layers if name in layer))

    for name in ("num_train_epochs", "distant_epochs"):
        value = getattr(args, name)
        if value < 1 or value != int(value):
            parser.error(f"--{name} must be a whole number >= 1 (ATLOP runs int(epochs) epochs), got {value}")
        setattr(args, name, int(value))
    for name in ("train_batch_size", "test_batch_size", "gradient_accumulation_steps", "synthetic_train_docs",
                 "synthetic_dev_docs", "vocab_size", "encoder_hidden_size", "encoder_layers", "encoder_heads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.synthetic_test_docs < 0:
        parser.error(f"--synthetic_test_docs must be >= 0, got {args.synthetic_test_docs}")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    for name in ("learning_rate", "classifier_lr"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name} must be > 0, got {getattr(args, name)}")
    if not 0 <= args.warmup_ratio <= 1:
        parser.error(f"--warmup_ratio must be in [0, 1] (a fraction of the optimiser steps), got {args.warmup_ratio}")
    if not 0 <= args.gamma < 1:
        parser.error(f"--gamma must be in [0, 1), got {args.gamma}")
    if args.emb_size % args.block_size:
        parser.error(f"--emb_size ({args.emb_size}) must be a multiple of --block_size ({args.block_size})")
    for name in ("save_path", "result_file"):  # found now, not at the first evaluation, an epoch in
        directory = os.path.dirname(getattr(args, name))
        if directory and not os.path.isdir(directory):
            parser.error(f"--{name}: the directory {directory!r} does not exist; create it first")
    if args.load_path and not os.path.isfile(args.load_path):  # before the data is read and tokenised
        parser.error(f"--load_path: {args.load_path!r} does not exist")
    return args


# --- data ------------------------------------------------------------------------------------


def load_documents(args):
    """{"train", "dev", "test", "distant"} -> DocRED documents (test and distant may be absent)."""
    if args.synthetic:
        docs = {"train": docred.synthetic_docs(args.synthetic_train_docs, seed=args.seed, title_prefix="train"),
                "dev": docred.synthetic_docs(args.synthetic_dev_docs, seed=args.seed + 1, title_prefix="dev")}
        if args.synthetic_test_docs:
            docs["test"] = docred.synthetic_docs(args.synthetic_test_docs, seed=args.seed + 2, title_prefix="test")
        return docs
    files = {"train": args.train_file, "dev": args.dev_file, "test": args.test_file, "distant": args.distant_file}
    docs = {}
    for split, name in files.items():
        if not name:
            continue
        path = os.path.join(args.data_dir, name)
        if not os.path.isfile(path):
            flag = "--distant_file" if split == "distant" else f"--{split}_file"
            why = "" if flag in args.data_flags else (
                f" ({flag} is ATLOP's default: {', '.join(args.data_flags)} left the offline demo, which any data "
                "flag does)")
            raise SystemExit(f"{flag}: {path} does not exist (it is joined to --data_dir {args.data_dir!r}){why}; pass "
                             "the directory holding the DocRED files as --data_dir")
        docs[split] = docred.load_json(path)
    for split in ("train", "dev"):
        if split not in docs:
            raise SystemExit(f"--{split}_file must name a file: training and evaluation need it")
    return docs


def load_rel2id(args, docs):
    """Relation ids as ATLOP reads them (meta/rel2id.json under the working directory), from
    --rel2id, from --data_dir/meta, or built from the data (then ids follow sorted relation names
    and do not match published checkpoints)."""
    candidates = [args.rel2id] if args.rel2id else ([] if args.synthetic else [
        os.path.join("meta", "rel2id.json"), os.path.join(args.data_dir, "meta", "rel2id.json")])
    for path in candidates:
        if os.path.isfile(path):
            rel2id = docred.load_json(path)
            unknown = sorted(docred.build_rel2id(*docs.values()).keys() - {docred.NA_RELATION} - rel2id.keys())
            if unknown:
                flag = "--rel2id" if args.rel2id else "meta/rel2id.json"
                raise SystemExit(f"{flag}: {path} has no id for {len(unknown)} relation(s) of the data ("
                                 f"{', '.join(unknown[:5])}{', ...' if len(unknown) > 5 else ''}); pass the "
                                 "rel2id.json the data was labelled with (DocRED's meta/rel2id.json)")
            return rel2id, path
    if args.rel2id:
        raise SystemExit(f"--rel2id: {args.rel2id} does not exist")
    return docred.build_rel2id(*docs.values()), None


def read_features(docs, tokenizer, rel2id, args):
    return {split: docred.read_docred(split_docs, tokenizer, rel2id, args.max_seq_length)
            for split, split_docs in docs.items()}


def _hub_unreachable_reason():
    """Why from_pretrained must stay off the Hugging Face hub, or None when it may go there.
    A TCP probe of where the hub client would connect first (the proxy for the endpoint's scheme
    when one is set, as for the client, else the endpoint), bounded by HUB_PROBE_TIMEOUT_S (name
    resolution included, which socket timeouts do not cover), so a machine without network fails
    fast instead of waiting through the hub client's retries."""
    for switch in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        if os.environ.get(switch, "").upper() in ("1", "ON", "YES", "TRUE"):
            return f"switched off ({switch})"
    host, port = _hub_probe_address()
    return None if _answers(host, port) else f"unreachable ({host}:{port} did not answer)"


def _hub_probe_address():
    """(host, port) of the hub's endpoint (HF_ENDPOINT), or of the proxy that reaches it
    (HTTPS_PROXY and the like, unless NO_PROXY exempts the endpoint's host)."""
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    proxies = urllib.request.getproxies()
    proxy = proxies.get(endpoint.scheme) or proxies.get("all")
    if proxy and not urllib.request.proxy_bypass(endpoint.hostname):
        endpoint = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    return endpoint.hostname, endpoint.port or (443 if endpoint.scheme == "https" else 80)


@functools.lru_cache(maxsize=None)
def _answers(host, port):
    """Whether a TCP connection to host:port opens within HUB_PROBE_TIMEOUT_S (once per process:
    the config, the tokenizer and the model ask in turn)."""
    reached = []

    def probe():
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=HUB_PROBE_TIMEOUT_S):
            reached.append(True)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(HUB_PROBE_TIMEOUT_S)
    return bool(reached)


def _from_pretrained(loader, name, flag, **kwargs):
    """loader.from_pretrained(name) from a local directory, the local cache, or the hub when it
    answers; a hub id that is nowhere here ends the run with a message saying what to do."""
    local_directory = os.path.isdir(name)
    hub_off = None if local_directory else _hub_unreachable_reason()
    try:
        return loader.from_pretrained(name, local_files_only=local_directory or hub_off is not None, **kwargs)
    except OSError as error:
        if hub_off is None:
            raise SystemExit(f"{flag}: could not load {name!r}: {error}") from error
        raise SystemExit(
            f"{flag}: {name!r} is not a local directory, the Hugging Face hub is {hub_off} and it is not in "
            f"the local cache. Download it where there is network (e.g. `hf download {name} --local-dir DIR`; "
            f"older huggingface_hub: `huggingface-cli download`) and pass {flag} DIR.") from error


def build_encoder(args, docs, num_classes):
    """(tokenizer, encoder) with ATLOP's config attributes set, as ATLOP's train.py sets them."""
    if args.model_name_or_path is None:
        tokenizer = docred.wordpiece_tokenizer(docs["train"], vocab_size=args.vocab_size)
        config = BertConfig(vocab_size=len(tokenizer), hidden_size=args.encoder_hidden_size,
                            num_hidden_layers=args.encoder_layers, num_attention_heads=args.encoder_heads,
                            intermediate_size=4 * args.encoder_hidden_size, pad_token_id=tokenizer.pad_token_id,
                            num_labels=num_classes)
        encoder = BertModel(config)
    else:
        config = _from_pretrained(AutoConfig, args.config_name or args.model_name_or_path,
                                  "--config_name" if args.config_name else "--model_name_or_path",
                                  num_labels=num_classes)
        tokenizer = _from_pretrained(AutoTokenizer, args.tokenizer_name or args.model_name_or_path,
                                     "--tokenizer_name" if args.tokenizer_name else "--model_name_or_path")
        encoder = _from_pretrained(AutoModel, args.model_name_or_path, "--model_name_or_path", config=config,
                                   attn_implementation="eager")
    config = encoder.config  # from_pretrained keeps its own copy of the config passed in
    config.transformer_type = args.transformer_type
    config.cls_token_id, config.sep_token_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return tokenizer, encoder


# --- processes, precision --------------------------------------------------------------------


class Processes:
    """This process's place under torchrun (WORLD_SIZE, RANK, LOCAL_RANK), or a single process."""

    def __init__(self):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        if self.world_size > 1:
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            # Ranks > 0 wait at a barrier while rank 0 evaluates (a DocRED dev pass takes minutes).
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo",
                                    timeout=datetime.timedelta(hours=1))

    @property
    def distributed(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0

    def barrier(self):
        if self.distributed:
            dist.barrier()

    def close(self):
        """Destroy the process group, once the DDP model is gone (see main).

        Gloo's process group joins its worker threads when it is destroyed, and a worker may still
        be freeing a finished collective, which takes the GIL. Destroyed by a C++ owner that holds
        the GIL (seen: DDP's reducer, when the DDP model outlived destroy_process_group), the group
        waits for that worker while the worker waits for the GIL: a hang at exit, in about 1 run in
        40 of the two-process demo here (torch 2.13). Released from a Python handle, the group is
        destroyed with the GIL released (torch binds ProcessGroup so). So the DDP model is gone
        before this runs, and the handle taken below is the group's last owner (unless something
        else kept one, which then frees it from Python too)."""
        if self.distributed:
            group = dist.group.WORLD
            dist.destroy_process_group()
            del group  # the group's last owner: destroyed here, without the GIL


def autocast_dtype(amp, device):
    if amp == "auto":
        return torch.float16 if device.type == "cuda" else None
    return AMP_DTYPES[amp]


def seed_everything(seed):
    random.seed(seed)
    torch.manual_seed(seed)  # CPU and every CUDA device


# --- evaluation --------------------------------------------------------------------------------


def pair_scores(model, features, args, device, amp_dtype):
    """:meth:`DocREModel.pair_scores` of every pair of ``features``, in their order, as fp32 on the CPU."""
    model.eval()
    scores = []
    with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        # A generator of its own: a DataLoader draws a seed from the global one otherwise, and an
        # evaluation (run on a new best dev F1 only) would shift training's dropout stream.
        batches = DataLoader(features, batch_size=args.test_batch_size, collate_fn=docred.collate_fn,
                             generator=torch.Generator())
        for input_ids, attention_mask, _, entity_pos, hts in batches:
            scores.append(model.pair_scores(input_ids.to(device), attention_mask.to(device), entity_pos, hts).float()
                          .cpu())
    return torch.cat(scores) if scores else torch.zeros(0, model.bilinear.num_classes)


def dev_labels(features, rel2id):
    """The dev pairs' labels ``[pairs, classes]``, built once per run: from ATLOP's nested lists
    this takes seconds at DocRED's size (0.9 s for 200 documents of 360 pairs on this project's CPU,
    so about 5 s for DocRED's 1000), and every evaluation needs them."""
    return docred.pair_labels([f["labels"] for f in features["dev"]], len(rel2id))


def evaluate(model, features, docs, rel2id, args, device, amp_dtype, labels):
    """Dev metrics (fractions): ATLOP's official F1 and Ign F1 (against the annotated training
    facts), precision, recall, and NCRE per entity pair (`labels`: dev_labels)."""
    scores = pair_scores(model, features["dev"], args, device, amp_dtype)
    answers = docred.to_official(model.predict(scores), features["dev"], rel2id)
    metrics = docred.evaluate(answers, docs["dev"], train_docs=docs["train"])
    metrics["ncre"] = ncre(scores, labels).item()
    return {f"dev_{name}": value for name, value in metrics.items()}


def write_test_predictions(model, features, rel2id, args, device, amp_dtype):
    """Test predictions into --result_file as ATLOP's report(): [{"title", "h_idx", "t_idx", "r"}]."""
    if "test" not in features:
        return
    scores = pair_scores(model, features["test"], args, device, amp_dtype)
    with open(args.result_file, "w", encoding="utf-8") as fh:
        json.dump(docred.to_official(model.predict(scores), features["test"], rel2id), fh)


def emit(record):
    print(json.dumps(record), flush=True)


# --- training ----------------------------------------------------------------------------------


def build_optimizer(model, args):
    """ATLOP's two parameter groups in AdamW: the encoder at --learning_rate, the new layers at
    --classifier_lr with --classifier_weight_decay. weight_decay=0.0 for the encoder is explicit
    because torch's AdamW defaults to 0.01 (ATLOP's transformers AdamW defaulted to 0)."""
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if not any(k in n for k in HEAD_LAYERS)], "lr": args.learning_rate,
         "weight_decay": 0.0},
        {"params": [p for n, p in named if any(k in n for k in HEAD_LAYERS)], "lr": args.classifier_lr,
         "weight_decay": args.classifier_weight_decay},
    ]
    return torch.optim.AdamW(groups, lr=args.learning_rate, eps=args.adam_epsilon)


class Trainer:
    """ATLOP's finetune(): for each phase (distant data, then annotated), linear warmup and decay
    over the phase's optimiser steps, evaluation at the end of every epoch and every
    --evaluation_steps optimiser steps, and on a new best dev F1 within the phase: the checkpoint
    to --save_path and the test predictions to --result_file."""

    def __init__(self, model, features, docs, rel2id, args, processes):
        self.model, self.features, self.docs, self.rel2id, self.args = model, features, docs, rel2id, args
        self.processes = processes
        self.device = processes.device
        self.dev_labels = None  # built at the first evaluation (rank 0 only)
        self.amp_dtype = autocast_dtype(args.amp, self.device)
        # find_unused_parameters: BERT's pooler is in the encoder but ATLOP never uses it.
        self.trained = (torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
                        if processes.distributed else model)
        self.optimizer = build_optimizer(model, args)
        # A disabled scaler passes losses and steps through unchanged: one code path for every --amp.
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.amp_dtype == torch.float16)
        self.start = time.perf_counter()

    def loader(self, features):
        """Shuffled batches; run_phase reseeds the order at every epoch (seed + epoch)."""
        if self.processes.distributed:
            sampler = DistributedSampler(features, num_replicas=self.processes.world_size, rank=self.processes.rank,
                                         shuffle=True, seed=self.args.seed, drop_last=True)
        else:
            sampler = RandomSampler(features, generator=torch.Generator())
        # drop_last as ATLOP: every batch has train_batch_size documents.
        return DataLoader(features, batch_size=self.args.train_batch_size, sampler=sampler,
                          collate_fn=docred.collate_fn, drop_last=True)

    def run_phase(self, phase, features, epochs):
        args, accumulation = self.args, self.args.gradient_accumulation_steps
        loader = self.loader(features)
        if len(loader) == 0:
            raise SystemExit(f"{phase}: {len(features)} documents make no batch of --train_batch_size "
                             f"{args.train_batch_size} per process; lower --train_batch_size")
        steps_per_epoch = math.ceil(len(loader) / accumulation)
        total_steps = steps_per_epoch * epochs
        warmup_steps = int(total_steps * args.warmup_ratio)
        scheduler = get_linear_schedule_with_warmup(self.optimizer, warmup_steps, total_steps)
        if self.processes.is_main:
            print(f"{phase}: {len(features)} documents, {total_steps} optimiser steps ({warmup_steps} warmup)",
                  file=sys.stderr)
        best_f1, step, losses = -1.0, 0, []
        for epoch in range(epochs):
            if self.processes.distributed:
                loader.sampler.set_epoch(epoch)  # DistributedSampler shuffles with seed + epoch
            else:
                loader.sampler.generator.manual_seed(args.seed + epoch)
            self.trained.train()
            batches = tqdm(loader, desc=f"{phase} epoch {epoch + 1}/{epochs}", leave=False, file=sys.stderr,
                           disable=not self.processes.is_main)
            for index, batch in enumerate(batches):
                group_start = index - index % accumulation
                group_size = min(accumulation, len(loader) - group_start)  # the epoch's last group may be short
                steps_now = index + 1 == group_start + group_size
                losses.append(self.backward(batch, group_size, sync=steps_now))
                if not steps_now:
                    continue
                self.optimizer_step(scheduler)
                step += 1
                last_of_epoch = index + 1 == len(loader)
                if last_of_epoch or (args.evaluation_steps > 0 and step % args.evaluation_steps == 0):
                    best_f1 = self.evaluate_and_keep_best(phase, epoch + 1, step, losses, best_f1)
                    losses = []
                    self.trained.train()

    def backward(self, batch, group_size, sync):
        input_ids, attention_mask, labels, entity_pos, hts = batch
        # DDP all-reduces gradients only on the last batch before an optimiser step.
        no_sync = self.trained.no_sync() if self.processes.distributed and not sync else contextlib.nullcontext()
        with no_sync:
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                loss = self.trained(input_ids.to(self.device), attention_mask.to(self.device), labels=labels,
                                    entity_pos=entity_pos, hts=hts)[0]
            # The mean over the accumulated batches, as ATLOP's loss / gradient_accumulation_steps.
            self.scaler.scale(loss.float() / group_size).backward()
        return loss.item()

    def optimizer_step(self, scheduler):
        if self.args.max_grad_norm > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.max_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def evaluate_and_keep_best(self, phase, epoch, step, losses, best_f1):
        if self.processes.is_main:
            if self.dev_labels is None:
                self.dev_labels = dev_labels(self.features, self.rel2id)
            metrics = evaluate(self.model, self.features, self.docs, self.rel2id, self.args, self.device,
                               self.amp_dtype, self.dev_labels)
            improved = metrics["dev_f1"] > best_f1
            emit({"phase": phase, "epoch": epoch, "step": step, "train_loss": sum(losses) / len(losses), **metrics,
                  "best": improved, "elapsed_s": round(time.perf_counter() - self.start, 1)})
            if improved:
                best_f1 = metrics["dev_f1"]
                write_test_predictions(self.model, self.features, self.rel2id, self.args, self.device,
                                       self.amp_dtype)
                if self.args.save_path:
                    torch.save(self.model.state_dict(), self.args.save_path)
        self.processes.barrier()
        return best_f1


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    processes = Processes()
    try:
        # The model, DDP's included, lives in run's frame: gone when it returns, before the
        # process group goes (Processes.close).
        run(args, processes)
    except BaseException as error:
        if processes.distributed:  # the tracebacks' frames hold the model: let it go all the same
            clear_frames(error)
        raise
    finally:
        processes.close()


def clear_frames(error):
    """Drop the local variables of the finished frames in the tracebacks of `error` and of the
    exceptions it chains (causes and contexts), which keep the objects those frames held alive."""
    pending, seen = [error], set()
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        traceback.clear_frames(error.__traceback__)
        pending += [error.__cause__, error.__context__]


def run(args, processes):
    """Train, or with --load_path evaluate, as `args` say."""
    seed_everything(args.seed)
    docs = load_documents(args)
    rel2id, rel2id_path = load_rel2id(args, docs)
    num_classes = args.num_class or len(rel2id)
    if num_classes != len(rel2id):
        raise SystemExit(f"--num_class {args.num_class} does not match the {len(rel2id)} relation ids of "
                         f"{rel2id_path or 'the data'}; pass --num_class {len(rel2id)} or the matching --rel2id")
    tokenizer, encoder = build_encoder(args, docs, num_classes)
    # Evaluating a checkpoint reads only dev and test (Ign F1 needs the training documents, not
    # their features): the training and distant sets are not tokenised.
    features = read_features({split: split_docs for split, split_docs in docs.items()
                              if not args.load_path or split in ("dev", "test")}, tokenizer, rel2id, args)
    seed_everything(args.seed)  # as ATLOP: the head's initialisation does not depend on what came before
    model = DocREModel(encoder.config, encoder, args.emb_size, args.block_size, args.num_labels, loss=args.loss,
                       gamma=args.gamma, margin_reg=args.margin_reg, symmetric=args.symmetric)
    model.to(processes.device)
    if processes.is_main:
        print(f"{'synthetic demo' if args.synthetic else args.data_dir}: "
              + ", ".join(f"{len(f)} {split}" for split, f in features.items())
              + f" documents; {num_classes} classes (ids: {rel2id_path or 'built from the data'}); "
              f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; preset {args.preset}: "
              f"loss={args.loss} gamma={args.gamma} margin_reg={args.margin_reg} symmetric={args.symmetric}; "
              f"{processes.world_size} process(es) on {processes.device}", file=sys.stderr)

    if args.load_path:
        if processes.is_main:
            amp_dtype = autocast_dtype(args.amp, processes.device)
            state = torch.load(args.load_path, map_location=processes.device, weights_only=True)
            try:
                model.load_state_dict(state, strict=True)
            except RuntimeError as error:
                raise SystemExit(
                    f"--load_path: {args.load_path} does not fit this model ({str(error).splitlines()[-1].strip()}); "
                    "give the flags it was trained with: --model_name_or_path, --emb_size, --block_size, --preset "
                    "(offline demo: also --synthetic_train_docs, --vocab_size and --encoder_*, since the demo "
                    "builds its tokenizer from the training documents)") from error
            emit({"phase": "load", **evaluate(model, features, docs, rel2id, args, processes.device, amp_dtype,
                                              dev_labels(features, rel2id))})
            write_test_predictions(model, features, rel2id, args, processes.device, amp_dtype)
        processes.barrier()
        return
    trainer = Trainer(model, features, docs, rel2id, args, processes)
    if "distant" in features:
        trainer.run_phase("distant", features["distant"], args.distant_epochs)
    trainer.run_phase("annotated", features["train"], args.num_train_epochs)


if __name__ == "__main__":
    main()
