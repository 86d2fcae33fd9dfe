"""Every bad input of docs/spec.md gets a ValueError/TypeError naming the argument, before any kernel
runs, whichever backend is asked for."""
import importlib.metadata
import os
import pathlib
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import ncrl_kernels
from ncrl_kernels import _dispatch, _extension

from conftest import all_backends, make_head_inputs, make_logits

N, E, B, C = 6, 16, 4, 3


@pytest.fixture
def good():
    hs, ts, weight, bias, labels = make_head_inputs(N, E, B, C)
    return dict(hs=hs, ts=ts, weight=weight, bias=bias, labels=labels)


def fused(args, backend, **kw):
    return ncrl_kernels.fused_ncrl(args["hs"], args["ts"], args["weight"], args["bias"], args["labels"],
                                   block_size=kw.pop("block_size", B), backend=backend, **kw)


def head(args, backend, **kw):
    return ncrl_kernels.group_bilinear(args["hs"], args["ts"], args["weight"], args["bias"],
                                       block_size=kw.pop("block_size", B), backend=backend, **kw)


BAD_HEAD_INPUTS = [
    pytest.param("ts", lambda a: a["ts"][:, :8], ValueError, "same shape", id="hs-ts-shape"),
    pytest.param("ts", lambda a: a["ts"][:-1], ValueError, "same shape", id="hs-ts-rows"),
    pytest.param("weight", lambda a: a["weight"][:, :-1], ValueError, "weight", id="weight-shape"),
    pytest.param("weight", lambda a: a["weight"].T, ValueError, r"which is \(E\*block_size, C\); pass weight\.T",
                 id="weight-transposed"),
    pytest.param("bias", lambda a: a["bias"][:-1], ValueError, "bias", id="bias-shape"),
    pytest.param("hs", lambda a: a["hs"].long(), TypeError, "hs", id="hs-int"),
    pytest.param("ts", lambda a: a["ts"].to(torch.complex64), TypeError, "ts", id="ts-complex"),
    pytest.param("weight", lambda a: a["weight"].int(), TypeError, "weight", id="weight-int"),
    pytest.param("bias", lambda a: a["bias"].long(), TypeError, "bias", id="bias-int"),
    pytest.param("hs", lambda a: a["hs"].double(), TypeError, "dtype", id="mixed-dtypes"),
    pytest.param("hs", lambda a: a["hs"][0], ValueError, "hs", id="hs-1d"),
    pytest.param("hs", lambda a: a["hs"].tolist(), TypeError, "hs", id="hs-list"),
    pytest.param("bias", lambda a: a["bias"].to("meta"), ValueError, "device", id="bias-other-device"),
    pytest.param("ts", lambda a: a["ts"].to("meta"), ValueError, "device", id="ts-other-device"),
]

BAD_LABELS = [
    pytest.param(lambda a: a["labels"][:, :-1], ValueError, "labels.*column 0 is the none class",
                 id="labels-without-none-column"),
    pytest.param(lambda a: a["labels"][:-1], ValueError, r"labels must have shape \(N, C\) = \(6, 3\), got \(5, 3\)$",
                 id="labels-rows"),
    pytest.param(lambda a: a["labels"].argmax(1), ValueError, "multi-hot", id="labels-class-index"),
    pytest.param(lambda a: a["labels"].argmax(1, keepdim=True), ValueError, "multi-hot",
                 id="labels-class-index-column"),
    pytest.param(lambda a: a["labels"].T, ValueError, "transposed", id="labels-transposed"),
    pytest.param(lambda a: a["labels"].to(torch.complex64), TypeError, "labels", id="labels-complex"),
    pytest.param(lambda a: a["labels"].to("meta"), ValueError, "labels", id="labels-other-device"),
    pytest.param(lambda a: a["labels"].tolist(), TypeError, "labels", id="labels-list"),
]


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("arg,corrupt,error,match", BAD_HEAD_INPUTS)
def test_bad_head_inputs(device, backend, good, arg, corrupt, error, match):
    good = {k: v.to(device) for k, v in good.items()}
    good[arg] = corrupt(good)
    with pytest.raises(error, match=match):
        head(good, backend)
    with pytest.raises(error, match=match):
        fused(good, backend)


@pytest.mark.parametrize("device,backend", all_backends())
def test_block_size_must_divide_emb(device, backend, good):
    good = {k: v.to(device) for k, v in good.items()}
    for fn in (head, fused):
        with pytest.raises(ValueError, match="block_size"):
            fn(good, backend, block_size=5)
        with pytest.raises(ValueError, match="block_size"):
            fn(good, backend, block_size=0)


@pytest.mark.parametrize("device,backend", all_backends())
@pytest.mark.parametrize("corrupt,error,match", BAD_LABELS)
def test_bad_labels(device, backend, good, corrupt, error, match):
    good = {k: v.to(device) for k, v in good.items()}
    labels = corrupt(good)
    with pytest.raises(error, match=match):
        fused({**good, "labels": labels}, backend)
    for fn in (ncrl_kernels.ncrl_loss, ncrl_kernels.atl_loss, ncrl_kernels.bce_loss):
        with pytest.raises(error, match=match):
            fn(make_logits(N, C, device=device), labels, backend=backend)


@pytest.mark.parametrize("device,backend", all_backends())
def test_bad_loss_arguments(device, backend, good):
    good = {k: v.to(device) for k, v in good.items()}
    logits = make_logits(N, C, device=device)
    for gamma in (-0.1, 1.0, 1.5, float("nan"), "0.1", torch.tensor(0.05)):
        with pytest.raises(ValueError, match="gamma"):
            fused(good, backend, gamma=gamma)
        with pytest.raises(ValueError, match="gamma"):
            ncrl_kernels.ncrl_loss(logits, good["labels"], gamma=gamma, backend=backend)
    with pytest.raises(ValueError, match="reduction"):
        fused(good, backend, reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        ncrl_kernels.atl_loss(logits, good["labels"], reduction="batchmean", backend=backend)
    with pytest.raises(ValueError, match="loss"):
        fused(good, backend, loss="focal")
    with pytest.raises(TypeError, match="logits"):
        ncrl_kernels.bce_loss(logits.long(), good["labels"], backend=backend)
    with pytest.raises(ValueError, match="2 classes"):
        ncrl_kernels.ncrl_loss(logits[:, :1], good["labels"][:, :1], backend=backend)


def test_unknown_backend(good):
    with pytest.raises(ValueError, match="backend"):
        fused(good, "mkl")
    with pytest.raises(ValueError, match="backend"):
        ncrl_kernels.ncrl_loss(make_logits(N, C), good["labels"], backend=None)


def test_backend_that_cannot_run_says_why(good, monkeypatch, tmp_path):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="'cuda' runs on CUDA tensors"):
            fused(good, "cuda")
    monkeypatch.setattr(_extension, "LOAD_ERROR", _extension.load_error(ImportError("simulated"), tmp_path))
    with pytest.raises(ValueError, match="not built.*simulated; reinstall with `pip install"):
        fused(good, "cpp")
    assert ncrl_kernels.available_backends("cpu")[0] == "reference"
    assert "cpp" not in ncrl_kernels.available_backends("cpu")
    # "auto" falls back to the reference.
    assert torch.isfinite(fused(good, "auto"))


def test_build_without_openmp_says_so(tmp_path):
    """A C++ compiler that does not build OpenMP code (Apple's clang; clang without libomp) builds
    the CPU kernels without -fopenmp, and the build log's line says they run on one thread: with
    the flag, ATen's headers include <omp.h> and the build stopped. Here a compiler that refuses
    -fopenmp, as setup.py's probe sees it (clang 14 without libomp, tried by hand, builds and passes
    the cpp tests)."""
    compiler = tmp_path / "c++"
    compiler.write_text('#!/bin/sh\nfor a in "$@"; do [ "$a" = -fopenmp ] && exit 1; done\nexec c++ "$@"\n')
    compiler.chmod(0o755)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, CXX=str(compiler)))
    assert out.returncode == 0, out.stderr[-3000:]
    (line,) = [line for line in out.stdout.splitlines() if line.startswith("ncrl_kernels: building")]
    assert f"without OpenMP, which the C++ compiler {compiler} does not build, so the CPU kernels run on one thread" in line


def test_wheel_requires_the_torch_it_is_built_against(tmp_path):
    """A wheel's extension loads with the torch it was compiled against only, so the wheel requires
    that release (installed elsewhere, a wider range would pull another torch, on Linux a CUDA
    build of several GB, to run the reference with); an sdist, compiled where it is installed,
    takes any supported torch. Read from the metadata setuptools writes for each."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def torch_required(*commands, base):
        out = subprocess.run([sys.executable, "setup.py", "-q", "egg_info", "--egg-base", str(base), *commands],
                             cwd=root, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        (requires,) = base.glob("*.egg-info/requires.txt")
        return requires.read_text().splitlines()[0]

    (tmp_path / "wheel").mkdir()
    (tmp_path / "sdist").mkdir()
    # The version pip knows: with its build tag where the distribution has one (PyTorch's CPU
    # build, 2.13.0+cpu), which "==2.13.0" would let PyPI's CUDA build satisfy.
    assert torch_required(base=tmp_path / "wheel") == f"torch=={importlib.metadata.version('torch')}"
    assert torch_required("sdist", "--dist-dir", str(tmp_path / "sdist"), base=tmp_path / "sdist") == "torch>=2.11"


@pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason="the extension is not built here")
def test_build_recorded_its_torch():
    from ncrl_kernels import _build_info
    assert _build_info.TORCH_VERSION == torch.__version__


def import_a_copy(tmp_path, leave_out, mapped):
    """In a fresh process, import a copy of the package (its files but those whose names start
    with one of `leave_out`) with a finder that answers for the modules `mapped` (name ->
    directory) where the copy has none, as setuptools' editable finder does for an install
    elsewhere: (the __init__.py imported, LOAD_ERROR, whether _C loaded)."""
    package = pathlib.Path(ncrl_kernels.__file__).parent
    copy = tmp_path / "copy" / "ncrl_kernels"
    copy.mkdir(parents=True)
    for path in package.iterdir():
        if not path.name.startswith((*leave_out, "__pycache__")):
            (copy / path.name).symlink_to(path)
    code = (
        "import importlib.machinery, sys, warnings\n"
        f"MAPPED = {mapped!r}\n"
        "class EditableFinder:  # first, before an editable install of this checkout, if any\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name in MAPPED and importlib.machinery.PathFinder.find_spec(name, path) is None:\n"
        "            return importlib.machinery.PathFinder.find_spec(name, [MAPPED[name]])\n"
        "sys.meta_path.insert(0, EditableFinder)\n"
        "warnings.simplefilter('ignore')\n"
        "import ncrl_kernels\n"
        "from ncrl_kernels import _extension\n"
        "print(ncrl_kernels.__file__)\n"
        "print(_extension.LOAD_ERROR)\n"
        "print('ncrl_kernels._C' in sys.modules)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(copy.parent), PYTHONSAFEPATH="1")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    imported, error, loaded = out.stdout.splitlines()[-3:]
    assert imported == str(copy / "__init__.py")
    return error, loaded == "True"


@pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason="the extension is not built here")
def test_extension_of_another_copy_is_not_loaded(tmp_path):
    """An editable install maps its own _C into an ncrl_kernels imported from anywhere else
    (setuptools' finder answers where the package's directory has none; make gpu-check's phases
    that run from a source tree meet it, as does a second checkout): that _C, built from other
    sources and perhaps for another torch, is not loaded, and the warning says why. Here a copy of
    the package without _C, whose _C the finder maps to this build."""
    package = pathlib.Path(ncrl_kernels.__file__).parent
    error, loaded = import_a_copy(tmp_path, ("_C",), {"ncrl_kernels._C": str(package)})
    assert f"{package}/_C" in error and f"is not in this package's directory {tmp_path / 'copy'}" in error
    assert not loaded


@pytest.mark.skipif(_extension.LOAD_ERROR is not None, reason="the extension is not built here")
def test_build_record_of_another_copy_is_not_read(tmp_path):
    """Nor is another copy's build record read for the package's own _C (here one that says it was
    built for another torch, which would keep the _C from loading): a _C without a record of its
    own loads unchecked, as builds from before the records do."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "_build_info.py").write_text("TORCH_VERSION = '2.0.0+old'\nCUDA_ARCHS = None\n")
    error, loaded = import_a_copy(tmp_path, ("_build_info",), {"ncrl_kernels._build_info": str(elsewhere)})
    assert error == "None" and loaded


def test_extension_built_for_another_torch_is_not_loaded():
    """An extension compiled against another torch (say, before `pip install -U torch`) may load
    and then corrupt memory on its first call, so it is not loaded at all: a warning says why and
    how to rebuild, and "auto" runs the reference. In a fresh process, with the recorded version
    replaced."""
    code = (
        "import sys, types, warnings\n"
        "sys.modules['ncrl_kernels._build_info'] = types.SimpleNamespace(TORCH_VERSION='2.0.0+old')\n"
        "import torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import ncrl_kernels\n"
        "from ncrl_kernels import _extension\n"
        "print(repr(_extension.LOAD_ERROR))\n"
        "print([w.category.__name__ for w in caught])\n"
        "print('ncrl_kernels._C' in sys.modules, ncrl_kernels.available_backends('cpu')[:2])\n"
        "print(float(ncrl_kernels.ncrl_loss(torch.randn(4, 3), torch.eye(3)[[0, 1, 2, 0]])) > 0)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode == 0, out.stderr[-3000:]
    error, categories, loaded, usable = out.stdout.splitlines()[-4:]
    assert f"compiled against torch 2.0.0+old and this is torch {torch.__version__}" in error
    assert "pip install --no-build-isolation" in error
    assert "ExtensionNotLoadedWarning" in categories
    assert loaded.startswith("False") and "'cpp'" not in loaded
    assert usable == "True"


def test_triton_needs_compute_capability_8(monkeypatch):
    """On a pre-Ampere GPU (here a simulated T4, sm_75) the Triton backend says why it cannot run,
    and "auto" moves on to the next backend."""
    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", True)
    monkeypatch.setattr(_dispatch, "TRITON_IMPORT_ERROR", None)
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "cuda_capability", lambda index: (7, 5))
    reason = _dispatch.unavailable_reason("triton", torch.device("cuda:0"))
    assert reason is not None and "compute capability 8.0" in reason and "7.5" in reason
    monkeypatch.setattr(_dispatch, "cuda_capability", lambda index: (8, 6))
    assert _dispatch.unavailable_reason("triton", torch.device("cuda:0")) is None


def pretend_cuda_gpu(monkeypatch, capability):
    """Both GPU backends installed (Triton and an extension with CUDA kernels for any arch) and a
    CUDA GPU of `capability` present, as far as the dispatch table can tell."""
    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", True)
    monkeypatch.setattr(_dispatch, "TRITON_IMPORT_ERROR", None)
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setattr(_dispatch, "_IMPLEMENTATIONS", dict(_dispatch._IMPLEMENTATIONS, triton=object()))
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "KERNEL_DEVICES", frozenset({"CPU", "CUDA"}))
    monkeypatch.setattr(_dispatch, "CUDA_ARCHS", None)  # whatever this build's arch list
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_dispatch, "cuda_capability", lambda index: capability)


def test_no_gpu_backend_on_rocm(monkeypatch):
    """A ROCm torch (AMD GPUs, device type "cuda", an MI300 reporting compute capability 9.4) gets
    neither GPU backend, each saying why, and "auto" runs the reference: the Triton kernels'
    configs are NVIDIA's (Hopper's need more shared memory than an MI300 has) and Triton's AMD
    backend has no 3xTF32, so the first call would fail."""
    pretend_cuda_gpu(monkeypatch, (9, 4))
    assert ncrl_kernels.available_backends("cuda:0") == ["reference", "cuda", "triton"]  # as on an H100
    monkeypatch.setattr(_dispatch, "ROCM", True)
    for backend in ("cuda", "triton"):
        reason = _dispatch.unavailable_reason(backend, torch.device("cuda:0"))
        assert reason is not None and "ROCm" in reason and "'reference'" in reason, reason
    assert ncrl_kernels.available_backends("cuda:0") == ["reference"]
    assert _dispatch.resolve("auto", torch.device("cuda:0")) is _dispatch._IMPLEMENTATIONS["reference"]


def test_triton_head_takes_up_to_128_classes(monkeypatch):
    """Past 128 classes the Triton head kernels' tiles need more shared memory than a GPU has
    (docs/triton.md, "Known limits"): backend="triton" refuses the head, saying why and what to
    use, and "auto" takes the next backend; the losses alone (no head) keep Triton."""
    pretend_cuda_gpu(monkeypatch, (9, 0))
    gpu, impls = torch.device("cuda:0"), _dispatch._IMPLEMENTATIONS
    assert _dispatch.resolve("triton", gpu, 128) is impls["triton"]
    assert _dispatch.resolve("auto", gpu, 128) is impls["triton"]
    assert _dispatch.resolve("auto", gpu, 129) is impls["cuda"]
    assert _dispatch.resolve("auto", gpu) is impls["triton"]  # the losses alone
    with pytest.raises(ValueError, match=r"up to 128 classes and the weight has 129.*'cuda' or 'reference'"):
        _dispatch.resolve("triton", gpu, 129)


@pytest.mark.skipif("triton" not in ncrl_kernels.available_backends("cpu"), reason="needs Triton's interpreter")
def test_triton_refuses_a_wide_head_through_the_api():
    hs, ts, weight = torch.randn(4, 8), torch.randn(4, 8), torch.randn(129, 8 * 4)
    labels = torch.zeros(4, 129)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: .*129.*use 'cpp' or 'reference'"):
        ncrl_kernels.fused_ncrl(hs, ts, weight, None, labels, block_size=4, backend="triton")
    with pytest.raises(ValueError, match="129"):
        ncrl_kernels.group_bilinear(hs, ts, weight, block_size=4, backend="triton")


@pytest.mark.skipif("triton" not in ncrl_kernels.available_backends("cpu"), reason="needs Triton's interpreter")
def test_triton_refuses_a_head_without_features(monkeypatch):
    """E=0 (logits are the bias): the Triton kernels split the feature rows, of which there are none;
    backend="triton" says so and what to use, "auto" takes the next backend, which gives the bias."""
    hs, ts, weight, bias = torch.randn(3, 0), torch.randn(3, 0), torch.randn(4, 0), torch.randn(4)
    with pytest.raises(ValueError, match=r"backend='triton' cannot run here: .*E=0.*use 'cpp' or 'reference'"):
        ncrl_kernels.group_bilinear(hs, ts, weight, bias, block_size=4, backend="triton")
    assert torch.equal(ncrl_kernels.group_bilinear(hs, ts, weight, bias, block_size=4), bias.expand(3, 4))
    # "auto" tries Triton first only on CUDA.
    pretend_cuda_gpu(monkeypatch, (9, 0))
    gpu, impls = torch.device("cuda:0"), _dispatch._IMPLEMENTATIONS
    assert _dispatch.resolve("auto", gpu, 4, 1) is impls["triton"]
    assert _dispatch.resolve("auto", gpu, 4, 0) is impls["cuda"]
    with pytest.raises(ValueError, match=r"E=0.*'cuda' or 'reference'"):
        _dispatch.resolve("triton", gpu, 4, 0)


@pytest.mark.parametrize("device,backend", all_backends())
def test_labels_that_require_grad(device, backend, good):
    """Labels that autograd would differentiate (soft labels from a model): the reference gives them
    their gradient; the fused backends, which take labels as constants, refuse them, rather than
    leave them without one, and take them detached or under no_grad."""
    good = {k: v.to(device) for k, v in good.items()}
    soft = good["labels"].float().requires_grad_()
    logits = make_logits(N, C).to(device)
    calls = (lambda y: ncrl_kernels.ncrl_loss(logits, y, backend=backend),
             lambda y: ncrl_kernels.fused_ncrl(good["hs"], good["ts"], good["weight"], good["bias"], y, block_size=B,
                                               backend=backend))
    for call in calls:
        if backend == "reference":
            assert torch.autograd.grad(call(soft), soft)[0].shape == soft.shape
        else:
            with pytest.raises(ValueError, match=r"labels require grad.*labels.detach\(\).*backend='reference'"):
                call(soft)
        call(soft.detach())
        with torch.no_grad():
            call(soft)


def test_cuda_backend_checks_the_built_architectures(monkeypatch):
    """The default build (TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX") has no code a T4 (7.5) can run: the
    'cuda' backend says so and how to rebuild, where its first launch would fail ("no kernel image
    is available"); 8.6 runs the sm_80 code, 12.0 the 9.0 PTX. Lists it cannot read are not checked."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_extension, "LOAD_ERROR", None)
    monkeypatch.setattr(_extension, "KERNEL_DEVICES", frozenset({"CPU", "CUDA"}))
    cases = [("8.0;9.0+PTX", (7, 5), False), ("8.0;9.0+PTX", (8, 0), True), ("8.0;9.0+PTX", (8, 6), True),
             ("8.0;9.0+PTX", (9, 0), True), ("8.0;9.0+PTX", (12, 0), True), ("8.0", (9, 0), False),
             ("7.5 8.0", (7, 5), True), ("Ampere", (7, 5), True), ("9.0a", (8, 0), True), (None, (7, 5), True)]
    for arch_list, capability, runs in cases:
        monkeypatch.setattr(_extension, "CUDA_ARCH_LIST", arch_list)
        monkeypatch.setattr(_dispatch, "CUDA_ARCHS", _dispatch.cuda_arch_list(arch_list) if arch_list else None)
        monkeypatch.setattr(_dispatch, "cuda_capability", lambda index, c=capability: c)
        reason = _dispatch.unavailable_reason("cuda", torch.device("cuda:0"))
        assert (reason is None) == runs, (arch_list, capability, reason)
        if not runs:
            assert f'TORCH_CUDA_ARCH_LIST="{capability[0]}.{capability[1]}"' in reason and "rebuild" in reason


def test_cuda_capability_is_a_compile_constant(monkeypatch):
    """Read once, then a constant that torch.compile bakes in, without warnings (Dynamo warns
    about, and traces through, an lru_cache wrapper)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index: (9, 0))
    monkeypatch.setattr(_dispatch, "_CAPABILITIES", {})
    torch._dynamo.reset()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        compiled = torch.compile(lambda x: x * _dispatch.cuda_capability(0)[0], backend="eager", fullgraph=True)
        out = compiled(torch.ones(2))
    assert out.tolist() == [9.0, 9.0] and _dispatch._CAPABILITIES == {0: (9, 0)}


def test_predict_arguments():
    with pytest.raises(TypeError, match="logits"):
        ncrl_kernels.predict(make_logits(N, C).long())
    with pytest.raises(TypeError, match="num_labels"):
        ncrl_kernels.predict(make_logits(N, C), num_labels=2.5)
    with pytest.raises(ValueError, match="logits"):
        ncrl_kernels.predict(make_logits(N, C)[0])
    with pytest.raises(ValueError, match="logits must have at least one column"):
        ncrl_kernels.predict(make_logits(N, C)[:, :0], num_labels=2)
    for threshold in ("0.5", True, torch.tensor(0.5)):
        with pytest.raises(TypeError, match="threshold"):
            ncrl_kernels.predict(make_logits(N, C), threshold=threshold)
    for threshold in (float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            ncrl_kernels.predict(make_logits(N, C), threshold=threshold)


def test_available_backends_on_cpu():
    names = ncrl_kernels.available_backends("cpu")
    assert names[:2] == ["reference", "cpp"]
    assert ("triton" in names) == (_dispatch.TRITON_INSTALLED and _dispatch.TRITON_INTERPRET)


def test_triton_needs_cuda_or_interpreter(good, monkeypatch):
    """The device is checked first: on CPU tensors without the interpreter, installing Triton
    would not help, so that is not what the message asks for."""
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    assert "triton" not in ncrl_kernels.available_backends("cpu")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        fused(good, "triton")
    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", False)
    with pytest.raises(ValueError, match="run on CUDA tensors, these are on cpu"):
        fused(good, "triton")
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", True)
    with pytest.raises(ValueError, match="not installed"):
        fused(good, "triton")
    assert "triton" not in ncrl_kernels.available_backends("cuda")


@pytest.mark.skipif("triton" not in ncrl_kernels.available_backends("cpu"), reason="needs Triton's interpreter")
def test_triton_interpreter_refuses_bf16_heads(good):
    """The interpreter has no bf16 (its dots on bf16 operands return logits of 1e11), so the head
    refuses bf16 inputs, also when autocast casts to bf16; the losses alone run on fp32 logits
    and take bf16 logits."""
    bf16 = dict(good, **{k: good[k].to(torch.bfloat16) for k in ("hs", "ts", "weight")})
    for call in (fused, head):
        with pytest.raises(ValueError, match="interpreter, which has no bf16"):
            call(bf16, "triton")
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="no bf16"):
            call(good, "triton")
    logits = torch.randn(N, C, dtype=torch.bfloat16)
    assert torch.equal(ncrl_kernels.ncrl_loss(logits, good["labels"], backend="triton"),
                       ncrl_kernels.ncrl_loss(logits.float(), good["labels"], backend="triton"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a GPU")
def test_cuda_backend_without_gpu_says_why():
    assert "cuda" not in ncrl_kernels.available_backends("cuda")
    reason = _dispatch.unavailable_reason("cuda", torch.device("cuda"))
    assert "no CUDA GPU" in reason or "without CUDA kernels" in reason


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_validation_never_syncs_the_gpu(good):
    good = {k: v.cuda() for k, v in good.items()}
    torch.cuda.set_sync_debug_mode("error")
    try:
        for backend in ncrl_kernels.available_backends("cuda"):
            with pytest.raises(ValueError):
                fused({**good, "labels": good["labels"][:, :-1]}, backend)
            fused(good, backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("device,backend", all_backends())
def test_autocast_rules(device, backend, good):
    """Under autocast, validation runs on the inputs as given (an int tensor is still refused) and
    dtypes are compared as autocast will run them: fp32/bf16 mix is fine, fp64 is never cast."""
    if backend == "triton" and device == "cpu":
        pytest.skip("the Triton interpreter has no bf16")
    good = {k: v.to(device) for k, v in good.items()}
    with torch.autocast(device, dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="hs"):
            fused({**good, "hs": good["hs"].long()}, backend)
        with pytest.raises(TypeError, match="one dtype"):
            fused({**good, "hs": good["hs"].double()}, backend)
        mixed = head({**good, "hs": good["hs"].to(torch.bfloat16)}, backend)
        assert mixed.dtype == torch.bfloat16
    if backend != "triton":
        with torch.autocast(device, dtype=torch.bfloat16):
            fp64 = head({k: (v.double() if k != "labels" else v) for k, v in good.items()}, backend)
        assert fp64.dtype == torch.float64


def test_numpy_scalars_are_accepted(good):
    value = fused(good, "auto", gamma=np.float32(0.05), block_size=np.int64(B))
    assert torch.isfinite(value)
    assert ncrl_kernels.predict(make_logits(N, C), num_labels=np.int64(2)).shape == (N, C)


def test_triton_on_cuda_needs_a_gpu_and_no_interpreter(monkeypatch):
    from ncrl_kernels import _dispatch

    monkeypatch.setattr(_dispatch, "TRITON_INSTALLED", True)
    monkeypatch.setattr(_dispatch, "TRITON_IMPORT_ERROR", None)
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", True)
    assert "interpreted" in _dispatch.unavailable_reason("triton", torch.device("cuda"))
    monkeypatch.setattr(_dispatch, "TRITON_INTERPRET", False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "no CUDA GPU" in _dispatch.unavailable_reason("triton", torch.device("cuda"))
    assert "triton" not in ncrl_kernels.available_backends("cuda")


@pytest.mark.parametrize("device,backend", all_backends())
def test_switches_must_be_bools(device, backend, good):
    """A string such as "False" would count as true; 0 and 1 pass."""
    good = {k: v.to(device) for k, v in good.items()}
    for name, value in (("symmetric", "False"), ("margin_reg", "yes"), ("return_logits", None)):
        with pytest.raises(TypeError, match=f"{name} must be True or False, got {value!r}"):
            fused(good, backend, **{name: value})
    with pytest.raises(TypeError, match="symmetric must be True or False"):
        head(good, backend, symmetric="True")
    with pytest.raises(ValueError, match="margin_reg must be True or False, got 2"):
        ncrl_kernels.ncrl_loss(make_logits(N, C, device=device), good["labels"], margin_reg=2, backend=backend)
    want = fused(good, backend, symmetric=True, margin_reg=False)
    torch.testing.assert_close(fused(good, backend, symmetric=1, margin_reg=0), want)
    torch.testing.assert_close(fused(good, backend, symmetric=np.True_, margin_reg=np.False_), want)


def test_device_errors_name_the_tensors(good):
    with pytest.raises(ValueError, match="labels is on meta but hs is on cpu"):
        fused({**good, "labels": good["labels"].to("meta")}, "auto")
    with pytest.raises(ValueError, match="labels is on meta but logits is on cpu"):
        ncrl_kernels.ncrl_loss(make_logits(N, C), good["labels"].to("meta"))


def test_meta_tensors(good):
    """Meta tensors (shape inference, e.g. a model built on the meta device) are validated and give
    outputs of the right shapes; torch.autocast has no meta device, which must not be asked about."""
    meta = {k: v.to("meta") for k, v in good.items()}
    assert head(meta, "auto").shape == (N, C)
    loss, logits = fused(meta, "auto", return_logits=True)
    assert loss.shape == () and logits.shape == (N, C) and logits.device.type == "meta"
    with pytest.raises(ValueError, match="same device"):
        head({**good, "hs": meta["hs"]}, "auto")
    # A backend made for other devices points to what runs on meta tensors.
    for backend in ("cpp", "cuda"):
        with pytest.raises(ValueError, match=r"these are on meta; use 'reference' or 'auto'"):
            head(meta, backend)


def test_extension_load_error_names_a_shadowing_checkout(tmp_path):
    """Run from a source checkout after a non-editable install, Python imports the checkout, which
    has no _C; its own message ("partially initialized module ... circular import") misleads."""
    error = ImportError("cannot import name '_C' from partially initialized module 'ncrl_kernels'")
    package = tmp_path / "ncrl_kernels"
    package.mkdir()
    assert _extension.load_error(error, package) == f"ImportError: {error}; {_extension.REBUILD}"  # not a checkout
    (tmp_path / "setup.py").touch()
    (tmp_path / "csrc").mkdir()
    message = _extension.load_error(error, package)
    assert f"source checkout {tmp_path}" in message and "run from another directory" in message
    (package / "_C.cpython-312-x86_64-linux-gnu.so").touch()  # built in place, for another torch
    assert _extension.load_error(error, package) == f"ImportError: {error}; {_extension.REBUILD}"
