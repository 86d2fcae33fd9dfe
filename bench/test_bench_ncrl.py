"""pytest-benchmark suite of the same cases as bench/run.py (head + NCRL, DocRED-shaped).

    .venv/bin/python -m pytest bench/test_bench_ncrl.py --benchmark-only
    BENCH_N="512 2048" .venv/bin/python -m pytest bench/test_bench_ncrl.py --benchmark-only --benchmark-json out.json
"""
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import harness  # noqa: E402
import run  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
N_PAIRS = [int(n) for n in os.environ.get("BENCH_N", "512 2048").split()]
PROVIDERS = [p for p in run.providers_for(DEVICE) if p != "gemm-bound"]
STEPS = {}


@pytest.mark.parametrize("n", N_PAIRS)
@pytest.mark.parametrize("mode", run.MODES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_head_ncrl(benchmark, provider, mode, n):
    step = STEPS.setdefault(provider, run.make_step(provider))
    case = run.make_case(n, 768, 64, 97, DEVICE)

    def clear():
        for p in case.params:
            p.grad = None

    if mode == "fwd":
        setup, fn = lambda: (clear(), ((),))[1], lambda: step(case)
    elif mode == "bwd":
        setup, fn = lambda: (clear(), ((step(case),),))[1], lambda loss: loss.backward()
    else:
        setup, fn = lambda: (clear(), ((),))[1], lambda: step(case).backward()

    def timed(*args):
        fn(*args)
        harness.synchronize(DEVICE)

    benchmark.extra_info.update(provider=provider, mode=mode, n_pairs=n, device=harness.device_name(DEVICE))
    benchmark.pedantic(timed, setup=lambda: (setup()[0], {}), rounds=3, warmup_rounds=1)
