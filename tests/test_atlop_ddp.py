"""fused_ncrl inside DocREModel under DistributedDataParallel (2 gloo ranks on the CPU) gives the
gradients of one process computing the mean of the two ranks' losses, including a step where one
rank's documents have no entity pairs (N = 0)."""
import datetime
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

transformers = pytest.importorskip("transformers")

from ncrl_kernels import docred  # noqa: E402
from ncrl_kernels.atlop import DocREModel  # noqa: E402

WORLD_SIZE = 2


def build_model(vocab_size, num_classes, cls_token_id, sep_token_id):
    """Same initial weights in every process; no dropout, so forwards are deterministic. The
    encoder keeps BERT's pooler, as ATLOP checkpoints do; ATLOP never uses it."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                     num_labels=num_classes)
    config.transformer_type, config.cls_token_id, config.sep_token_id = "bert", cls_token_id, sep_token_id
    return DocREModel(config, transformers.BertModel(config), emb_size=32, block_size=8, num_labels=3, gamma=0.05)


def loss_of(model, features):
    input_ids, attention_mask, labels, entity_pos, hts = docred.collate_fn(features)
    return model(input_ids, attention_mask, labels=labels, entity_pos=entity_pos, hts=hts)[0]


def gradients(model):
    return {name: None if p.grad is None else p.grad.clone() for name, p in model.named_parameters()}


def ddp_worker(rank, port, steps, model_args, out_dir):
    torch.set_num_threads(1)  # two ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        model = build_model(*model_args)
        # find_unused_parameters: the pooler gets no gradient (see docs/atlop.md, DDP).
        ddp = torch.nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
        per_step = []
        for features_per_rank in steps:
            ddp.zero_grad(set_to_none=True)
            loss_of(ddp, features_per_rank[rank]).backward()
            per_step.append(gradients(model))
        torch.save(per_step, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()
    # About 1 run in 10 hung in the interpreter's teardown (also at edc093e): the main thread,
    # finalising, destroys DDP's reducer and joins a gloo thread that waits for the GIL to free a
    # Python object. The results are saved, so leave without the teardown.
    os._exit(0)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_gradients_equal_single_process(tmp_path):
    docs = docred.synthetic_docs(8, seed=11)
    tokenizer = docred.wordpiece_tokenizer(docs, vocab_size=300)
    rel2id = docred.build_rel2id(docs)
    features = docred.read_docred(docs, tokenizer, rel2id)
    (no_pairs,) = docred.read_docred([dict(docs[0], title="one-entity", vertexSet=docs[0]["vertexSet"][:1],
                                           labels=[])], tokenizer, rel2id)
    assert no_pairs["hts"] == []
    steps = [
        [features[0:2], features[2:5]],  # ranks with different numbers of documents and pairs
        [features[5:8], [no_pairs]],  # rank 1 has no entity pair at all
    ]
    model_args = (len(tokenizer), len(rel2id), tokenizer.cls_token_id, tokenizer.sep_token_id)
    mp.spawn(ddp_worker, args=(free_port(), steps, model_args, str(tmp_path)), nprocs=WORLD_SIZE, join=True)

    model = build_model(*model_args)
    for step, features_per_rank in enumerate(steps):
        model.zero_grad(set_to_none=True)
        # DDP averages the ranks' gradients: the gradient of the mean of their losses.
        (sum(loss_of(model, f) for f in features_per_rank) / WORLD_SIZE).backward()
        want = gradients(model)
        assert want["model.pooler.dense.weight"] is None
        assert want["bilinear.weight"].abs().max() > 0
        for rank in range(WORLD_SIZE):
            got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)[step]
            for name, grad in want.items():
                if grad is None:
                    assert got[name] is None, f"step {step} rank {rank}: {name} has a gradient"
                else:
                    torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7,
                                               msg=lambda m: f"step {step} rank {rank} {name}: {m}")
