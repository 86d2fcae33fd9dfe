"""fused_ncrl under FSDP2 (fully_shard, 2 gloo ranks on the CPU): the head weight is sharded
across ranks and gathered for the wrapped module's forward, where the fused op runs; the
gradients equal one process computing the mean of the ranks' losses, also when a rank has no
pairs (N = 0)."""
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import ncrl_kernels

WORLD_SIZE = 2
DIM, EMB, BLOCK, CLASSES = 8, 16, 4, 5


class PairHead(nn.Module):
    """ATLOP's extractors + fused group-bilinear head and NCRL, on given entity vectors."""

    def __init__(self):
        super().__init__()
        self.head_extractor = nn.Linear(2 * DIM, EMB)
        self.tail_extractor = nn.Linear(2 * DIM, EMB)
        self.bilinear = ncrl_kernels.GroupBilinearLoss(EMB, BLOCK, CLASSES, gamma=0.05)

    def forward(self, u, v, labels):
        hs = torch.tanh(self.head_extractor(torch.cat([u, v], 1)))
        ts = torch.tanh(self.tail_extractor(torch.cat([v, u], 1)))
        return self.bilinear(hs, ts, labels)


def pairs(n, seed):
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(n, CLASSES, generator=g) < 0.3).float()
    labels[:, 0] = (labels[:, 1:].sum(1) == 0).float()
    return torch.randn(n, DIM, generator=g), torch.randn(n, DIM, generator=g), labels


# Per step, the pair count of each rank; the second step leaves rank 1 without pairs.
STEPS = [(7, 4), (6, 0)]


def fsdp_worker(rank, port, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE,
                            timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = PairHead()
        fully_shard(model)
        assert model.bilinear.weight.to_local().shape[0] < CLASSES  # really sharded
        per_step = []
        for step, counts in enumerate(STEPS):
            model.zero_grad(set_to_none=True)
            model(*pairs(counts[rank], seed=10 * step + rank)).backward()
            per_step.append({name: p.grad.full_tensor() for name, p in model.named_parameters()})
        if rank == 0:
            torch.save(per_step, f"{out_dir}/fsdp.pt")
    finally:
        dist.destroy_process_group()
    # About 1 run in 10 aborted after this point, in the interpreter's teardown, after both ranks had
    # destroyed the process group ("terminate called without an active exception"; also at
    # edc093e; test_atlop_ddp's workers hung there instead): the results are saved, so leave
    # without the teardown.
    os._exit(0)


def test_fsdp_gradients_equal_single_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(fsdp_worker, args=(port, str(tmp_path)), nprocs=WORLD_SIZE, join=True)
    got = torch.load(tmp_path / "fsdp.pt", weights_only=True)

    torch.manual_seed(0)
    model = PairHead()
    for step, counts in enumerate(STEPS):
        model.zero_grad(set_to_none=True)
        (sum(model(*pairs(n, seed=10 * step + rank)) for rank, n in enumerate(counts)) / WORLD_SIZE).backward()
        for name, p in model.named_parameters():
            assert p.grad.abs().max() > 0, name
            torch.testing.assert_close(got[step][name], p.grad, rtol=1e-5, atol=1e-7,
                                       msg=lambda m: f"step {step} {name}: {m}")
