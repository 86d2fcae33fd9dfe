"""The benchmark scripts run end to end (tiny shapes): rows with the documented columns, a
correctness check against eager, and plots. Timings themselves are never asserted."""
import csv
import os
import sys

import pytest
import torch

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)

import harness  # noqa: E402
import plot  # noqa: E402
import run  # noqa: E402


def test_bench_run_and_plot(tmp_path):
    args = run.parse_args(["--device", "cpu", "--n", "8", "24", "--large-n", "40", "--reps", "2", "--seconds", "0", "--emb", "16",
                           "--block", "4", "--classes", "5", "--results", str(tmp_path)])
    rows = run.run(args)
    (path,) = tmp_path.glob("*.csv")
    with open(path) as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == harness.CSV_COLUMNS
        written = list(reader)
    assert len(written) == len(rows)
    providers = {r["provider"] for r in written}
    assert {"eager", "compiled", "gemm-bound", "fused-cpp"} <= providers
    assert {r["mode"] for r in written} == {"fwd", "bwd", "fwd_bwd"}
    large = [r for r in written if r["n_pairs"] == "40"]
    assert large and all(r["provider"].startswith("fused-") and r["mode"] == "fwd_bwd" for r in large)
    assert all(float(r["ms_p50"]) > 0 and float(r["ms_p20"]) <= float(r["ms_p80"]) for r in written)
    (png,) = plot.plot_file(str(path))
    assert os.path.getsize(png) > 0


def test_plot_marks_rows_of_older_runs(tmp_path):
    """Rows are appended run after run and a run need not measure every shape: each point is the
    newest row of its (provider, mode, dtype, N), and the commits are ordered newest first per
    dtype (the plot draws the older ones' points hollow and names them)."""
    path = tmp_path / "device.csv"

    def row(commit, stamp, dtype, n, ms, mode="fwd_bwd"):
        return dict(kernel="group_bilinear_ncrl", provider="eager", mode=mode, dtype=dtype, n_pairs=n, emb=16,
                    block=4, classes=5, ms_p50=ms, ms_p20=ms, ms_p80=ms, peak_mem_mib=1, device="d", commit=commit,
                    timestamp=stamp)

    rows = [row("old", "2026-01-01", "bf16", 8, 1.0), row("old", "2026-01-01", "bf16", 24, 2.0),
            row("old", "2026-01-01", "fp32", 8, 3.0), row("new", "2026-02-01", "bf16", 8, 4.0),
            row("new", "2026-02-02", "bf16", 8, 5.0), row("new", "2026-02-02", "bf16", 0, 1.0, mode="step")]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.CSV_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    shown = plot.newest_rows(str(path))
    assert sorted((r["dtype"], r["n_pairs"], r["commit"], r["ms_p50"]) for r in shown) == [
        ("bf16", "24", "old", "2.0"), ("bf16", "8", "new", "5.0"), ("fp32", "8", "old", "3.0")]
    assert plot.commits_newest_first([r for r in shown if r["dtype"] == "bf16"]) == ["new", "old"]
    assert len(plot.plot_file(str(path))) == 2


def test_rows_name_the_triton_launch_path(monkeypatch):
    """fused-triton rows measured with every launch through Triton's JITFunction.run (LeanLaunch
    off: NCRL_KERNELS_LEAN_LAUNCH=0, as make gpu-check sets after a failed check) are recorded as
    fused-triton-jit, not as the default path's figures."""
    _launch = pytest.importorskip("ncrl_kernels.triton_kernels._launch")
    monkeypatch.setattr(_launch, "LEAN", True)
    assert run.recorded_name("fused-triton") == "fused-triton"
    monkeypatch.setattr(_launch, "LEAN", False)
    assert [run.recorded_name(p) for p in ("fused-triton", "fused-cpp", "eager")] == ["fused-triton-jit", "fused-cpp",
                                                                                     "eager"]


def test_gpu_check_timeline_fits_its_budget():
    """make gpu-check's dry run (its logic with every command's expected duration, no GPU): each
    phase gets at least the time it expects, and the whole stays within the budget. A lent GPU
    runs it once; a phase cut short there is lost for that loan."""
    import re
    import subprocess

    script = os.path.join(os.path.dirname(BENCH), "bench", "gpu_check.sh")
    out = subprocess.run(["bash", script], capture_output=True, text=True, timeout=60,
                         env={**os.environ, "GPU_CHECK_DRY_RUN": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert not re.search(r"CUT|status 124|STOPPED|no time left", out.stdout), out.stdout[-3000:]
    budget = int(re.search(r"of (\d+)s\)", out.stdout).group(1))
    assert int(re.search(r"total (\d+)s", out.stdout).group(1)) <= budget


def test_interleaved_takes_turns():
    """Every measure once per round, each first in turn; the warm-up round is not kept, so a
    round's values pair up across measures."""
    calls = []
    measures = {name: (lambda name=name: calls.append(name) or len(calls)) for name in "abc"}
    values = harness.interleaved(measures, min_rounds=3)
    assert "".join(calls) == "abc" "bca" "cab" "abc"
    assert values == {"a": [6, 8, 10], "b": [4, 9, 11], "c": [5, 7, 12]}


def test_cuda_graph_rows_need_cuda():
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "cpu", "--cuda-graphs"])


def test_graph_jobs_come_after_the_plain_ones():
    """--cuda-graphs: every provider's fwd_bwd step again as a CUDA graph replay, once the case's
    plain rows are done (a capture that fails cannot upset them). Building the jobs touches no GPU."""
    args = run.parse_args(["--device", "cpu", "--n", "8", "--large-n", "0", "--emb", "16", "--block", "4",
                           "--classes", "5", "--modes", "fwd_bwd", "fwd", "--providers", "eager", "gemm-bound"])
    args.cuda_graphs = True  # as on a GPU
    keys = [key for key, _ in run.jobs(args, torch.device("cpu"), args.providers,
                                       {"eager": run.make_step("eager")})]
    assert [(mode, provider) for _, _, mode, provider in keys] == [
        ("fwd_bwd", "eager"), ("fwd_bwd", "gemm-bound"), ("fwd", "eager"), ("fwd", "gemm-bound"),
        ("fwd_bwd", "eager+graph"), ("fwd_bwd", "gemm-bound+graph")]


def test_plot_draws_graph_rows_in_their_providers_colors(tmp_path):
    bases = ["compiled", "eager", "fused-triton", "gemm-bound"]
    for provider in bases:
        plain, graph = plot.provider_style(provider, bases), plot.provider_style(provider + harness.GRAPH, bases)
        assert plain[1] == graph[1] and plain[0] != graph[0]
    assert len({plot.provider_style(p, bases)[1] for p in bases}) == len(bases)
    path = tmp_path / "gpu.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=harness.CSV_COLUMNS)
        writer.writeheader()
        for provider, ms in (("eager", 4.0), ("fused-triton", 1.4), ("eager+graph", 3.0), ("fused-triton+graph", 0.6)):
            for n in (1024, 4096):
                writer.writerow(dict(kernel=run.KERNEL, provider=provider, mode="fwd_bwd", dtype="bf16", n_pairs=n,
                                     emb=768, block=64, classes=97, ms_p50=ms, ms_p20=ms, ms_p80=ms, peak_mem_mib=10,
                                     device="gpu", commit="abc1234", timestamp="t"))
    (png,) = plot.plot_file(str(path))
    assert os.path.getsize(png) > 0


def test_summary_compares_graph_rows_with_graph_rows(capsys):
    """A '+graph' row (a CUDA graph replay: GPU time alone) is compared with the other providers'
    replays, never with their host-bound wall times."""
    def row(provider, ms, mib):
        return dict(dtype="bf16", n_pairs=4096, mode="fwd_bwd", provider=provider, ms_p50=ms, peak_mem_mib=mib)

    run.print_summary([row("eager", 4.0, 1000.0), row("compiled", 1.5, 400.0), row("fused-triton", 1.0, 50.0),
                       row("eager+graph", 3.0, 900.0), row("compiled+graph", 0.8, 400.0),
                       row("fused-triton+graph", 0.5, 45.0)])
    lines = {line.split()[4]: line for line in capsys.readouterr().out.splitlines() if "fwd_bwd" in line}
    assert "4.00x vs eager " in lines["fused-triton"] and "1.50x vs compiled " in lines["fused-triton"]
    assert "5.0% of eager" in lines["fused-triton"]
    assert "6.00x vs eager+graph" in lines["fused-triton+graph"]
    assert "1.60x vs compiled+graph" in lines["fused-triton+graph"]
    assert "5.0% of eager" in lines["fused-triton+graph"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bench_cuda_graph_rows(tmp_path):
    """bench/run.py --cuda-graphs on a GPU: the fwd_bwd step of eager, gemm-bound and fused-triton
    also replayed from a CUDA graph (a step that cannot be captured would be reported, and the run
    would fail). Not `compiled`, whose cold compile make gpu-check's bench phase pays once."""
    args = run.parse_args(["--n", "64", "--dtypes", "bf16", "--modes", "fwd_bwd", "--reps", "2", "--seconds", "0",
                           "--providers", "eager", "gemm-bound", "fused-triton", "--cuda-graphs",
                           "--results", str(tmp_path)])
    rows = run.run(args)
    providers = {r["provider"] for r in rows}
    assert {p + harness.GRAPH for p in providers if not p.endswith(harness.GRAPH)} <= providers
    assert all(r["peak_mem_mib"] > 0 for r in rows if r["provider"].endswith(harness.GRAPH))


def test_bench_refuses_a_wrong_provider(monkeypatch, tmp_path):
    wrong = lambda case: run.make_step("eager")(case) * 1.1  # noqa: E731
    monkeypatch.setattr(run, "make_step", lambda p: wrong if p == "fused-cpp" else run.loss_provider("reference"))
    args = run.parse_args(["--device", "cpu", "--n", "8", "--large-n", "0", "--seconds", "0", "--emb", "16", "--block", "4",
                           "--classes", "5", "--providers", "eager", "fused-cpp", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"fused-cpp \(fp32, N=8\): loss"):
        run.run(args)
    # The refused provider costs the others nothing: eager's rows are written, fused-cpp's not.
    with open(tmp_path / f"{harness.device_name(torch.device('cpu'))}.csv") as f:
        assert {r["provider"] for r in csv.DictReader(f)} == {"eager"}


@pytest.mark.parametrize("fails_in", ["forward", "backward"])
def test_bench_skips_a_failing_provider(monkeypatch, tmp_path, fails_in):
    class Failing(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            if fails_in == "forward":
                raise RuntimeError("no kernel for this GPU")
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("no kernel for this GPU")

    eager = run.loss_provider("reference")
    failing = lambda case: Failing.apply(eager(case))  # noqa: E731
    monkeypatch.setattr(run, "make_step", lambda p: failing if p == "fused-cpp" else eager)
    args = run.parse_args(["--device", "cpu", "--n", "8", "--large-n", "0", "--seconds", "0", "--emb", "16", "--block", "4",
                           "--classes", "5", "--providers", "eager", "fused-cpp", "--results", str(tmp_path)])
    with pytest.raises(SystemExit, match="fused-cpp .*failed: RuntimeError: no kernel for this GPU"):
        run.run(args)
    with open(tmp_path / f"{harness.device_name(torch.device('cpu'))}.csv") as f:
        written = {(r["provider"], r["mode"]) for r in csv.DictReader(f)}
    assert {("eager", mode) for mode in run.MODES} <= written
    assert written - {("eager", mode) for mode in run.MODES} <= {("fused-cpp", "fwd")}


def test_cpu_peak_memory_sees_allocations(tmp_path):
    # In a fresh process, as bench/run.py measures it: a 64 MiB tensor freed inside the step, and
    # a 16 MiB one kept, both after the heap has served (and freed) larger blocks.
    import concurrent.futures
    import multiprocessing

    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
        freed, kept = pool.submit(_measure_two_steps).result()
    assert 60 < freed < 100
    assert 14 < kept < 40


def _measure_two_steps():
    import torch

    device = torch.device("cpu")
    harness.prepare_memory_measurement(device)
    kept = []
    torch.ones(128 * 2**20 // 4).sum()  # allocated and freed before measuring
    freed = harness.peak_extra_mib(lambda _: torch.ones(64 * 2**20 // 4).sum(), device)
    return freed, harness.peak_extra_mib(lambda _: kept.append(torch.ones(16 * 2**20 // 4)), device)


def test_atlop_step_runs(tmp_path):
    """bench/atlop_step.py end to end on a tiny encoder: a step row per (batch, provider), and a
    head row (paired with the free head's steps) per (batch, head)."""
    pytest.importorskip("transformers")
    import atlop_step

    rows = atlop_step.main(["--device", "cpu", "--tiny", "--layers", "1", "--steps", "1", "--seconds", "0",
                            "--results", str(tmp_path)])
    batches = ("docred", "pairs")
    assert {(r["kernel"], r["provider"], r["mode"]) for r in rows} == {
        (f"atlop_step_{batch}", provider, "step") for batch in batches
        for provider in ("fused-cpp", "eager", "encoder-only")} | {
        (f"atlop_step_{batch}", provider, "head") for batch in batches for provider in ("fused-cpp", "eager")}
    assert all(r["ms_p50"] > 0 for r in rows if r["mode"] == "step")  # a head's paired difference may be noise


def test_host_path_runs(tmp_path):
    """bench/host_path.py end to end, in its own process (it sets TRITON_INTERPRET and stubs the
    Triton launches): a row per (family, call path) of every family available here."""
    import subprocess

    out = subprocess.run([sys.executable, os.path.join(BENCH, "host_path.py"), "--steps", "2", "--repeats", "2",
                          "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("*-host-path.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert {(r["family"], r["path"]) for r in rows} >= {("extension", p) for p in ("api", "function", "operator")}
    assert all(float(r["host_us_p50"]) > 0 for r in rows)
    assert all(r["launches"] == "4" for r in rows if r["family"] == "triton")


def test_kernels_script(tmp_path):
    """bench/kernels.py, which only a GPU check runs for real, end to end at a tiny shape: a row
    for every kernel, plain and symmetric, in TF32 and with 16-bit operands from fp32 hs and ts
    (a config that fails is reported, not raised, so a missing row is the failure)."""
    import kernels

    kernels.main(["--n", "40", "--accuracy-n", "40", "--emb", "16", "--block", "4", "--classes", "5", "--kinds",
                  "tf32", "bf16-amp", "--reps", "1", "--results", str(tmp_path)])
    (path,) = tmp_path.glob("*-kernels.csv")
    with open(path) as f:
        rows = list(csv.DictReader(f))
    assert {(r["kind"], r["kernel"], r["symmetric"]) for r in rows} == {
        (kind, k, s) for kind in ("tf32", "bf16-amp") for k in ("forward", "epilogue", "weight_grad", "input_grad")
        for s in ("0", "1")}
    assert all(float(r["max_rel_diff"]) == 0.0 for r in rows)  # every candidate agrees with the first


def test_live_storages_peak():
    """harness.LiveStorages, bench/memory_model.py's allocator model: the most bytes live at once,
    a storage counted from its allocation to its release, views of existing tensors not at all."""
    existing = torch.zeros(4096)
    with harness.LiveStorages([existing]) as tracker:
        a = torch.empty(2**18)  # 1 MiB
        b = torch.empty(2**19)  # 2 MiB
        del a
        c = torch.empty(2**17)  # 0.5 MiB, after a's release
        d = existing.t().view(64, 64)[1:]  # views of an existing tensor
    assert tracker.peak == 3 * 2**20
    assert {size for _, size in tracker.live.values()} == {2**21, 2**19}
    del b, c, d


def test_memory_model_runs(tmp_path):
    """bench/memory_model.py end to end, in its own process (it configures the Triton backend as
    for an sm_90 GPU), at DocRED's shape in bf16 (N=4096): a row, and the modelled peak of the
    eager route (fp32 d weight beside the bf16 copies: 55.3 MiB when written) between the
    operator route's 48.2 MiB, which a tracker that sent the calls there would report, and issue
    8's budget, 5% of eager's 1179 MiB measured on the H200."""
    import subprocess

    out = subprocess.run([sys.executable, os.path.join(BENCH, "memory_model.py"), "--n", "4096", "--dtypes", "bf16",
                          "--results", str(tmp_path)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (path,) = tmp_path.glob("*-memory.csv")
    with open(path) as f:
        (row,) = list(csv.DictReader(f))
    assert (row["dtype"], row["n_pairs"]) == ("bf16", "4096")
    assert 50 < float(row["peak_mem_mib"]) <= 0.05 * 1179


@pytest.mark.skipif("triton" not in __import__("ncrl_kernels").available_backends("cpu"),
                    reason="needs Triton (its interpreter on the CPU)")
def test_step_profile_times_the_weight_grad_launch():
    """bench/step_profile.py's host time to the weight grad's launch (which only a GPU check runs
    for real), on an interpreted fp32 Triton step: the launch comes inside the step, once each."""
    import step_profile

    case = run.make_case(8, 16, 4, 5, torch.device("cpu"))
    step = run.make_step("fused-triton")

    def once():
        step(case).backward()
    to_launch, whole = step_profile.host_to_weight_grad_launch(once, 2, torch.device("cpu"))
    assert 0 < to_launch < whole
