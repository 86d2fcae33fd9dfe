"""Builds ncrl_kernels._C: the C++ CPU kernels always, plus the CUDA kernels (csrc/cuda) when a CUDA
toolkit is found and the installed torch is a CUDA build. A GPU is not needed to build.

    pip install -v --no-build-isolation .       # or -e . for development
    NCRL_KERNELS_CPU_ONLY=1 pip install ...     # skip the CUDA kernels even where they could build

The build log says which was built in one line starting "ncrl_kernels: building" (pip prints the
log with -v). Architectures come from TORCH_CUDA_ARCH_LIST, "8.0;9.0+PTX" when unset.

The extension runs only with the torch it was compiled against, so the build uses the torch of the
environment (no build isolation: pyproject.toml does not list torch among the build requirements)
and records its version in _build_info.py next to the compiled _C, which the package checks before
loading the extension (ncrl_kernels/_extension.py), with the CUDA architectures built, which the
dispatcher checks against the GPU (ncrl_kernels/_dispatch.py).
"""
import glob
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

import setuptools
from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, get_cxx_compiler
except ImportError as exc:
    raise SystemExit(
        f"ncrl_kernels builds against the torch it will run with, and none is importable here ({exc}). "
        "Install torch first, then build without isolation: pip install --no-build-isolation ncrl_kernels "
        "(or . / -e . in a checkout; see README, 'Install'); an sdist too: python -m build --sdist --no-isolation"
    ) from exc

ROOT = os.path.dirname(os.path.abspath(__file__))
# The CUDA major version torch is built with ("13"), which the toolkit and the NVIDIA wheels' headers
# must match; None for a CPU torch.
TORCH_CUDA_MAJOR = torch.version.cuda and torch.version.cuda.split(".")[0]


def cuda_build_reason():
    """None when the CUDA kernels can be built here, else why not (printed in the build log)."""
    if os.environ.get("NCRL_KERNELS_CPU_ONLY", "0") == "1":
        return "NCRL_KERNELS_CPU_ONLY=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is not a CUDA build"
    if CUDA_HOME is None:
        return "no CUDA toolkit found (set CUDA_HOME)"
    # torch falls back to /usr/local/cuda whenever it exists, which runtime images ship without nvcc.
    nvcc = os.path.join(CUDA_HOME, "bin", "nvcc.exe" if os.name == "nt" else "nvcc")
    if not os.path.exists(nvcc):
        return f"no nvcc in the CUDA toolkit at {CUDA_HOME} (set CUDA_HOME to a full toolkit)"
    # torch's build stops with an error on a toolkit of another major version than its own: build
    # the CPU kernels instead, so that the package (and its Triton backend) still installs.
    release = nvcc_release(nvcc)
    if release is not None and release.split(".")[0] != TORCH_CUDA_MAJOR:
        return (f"the CUDA toolkit at {CUDA_HOME} is {release} and torch {torch.__version__} is built with CUDA "
                f"{torch.version.cuda}, which torch's build refuses "
                f"(set CUDA_HOME to a CUDA {TORCH_CUDA_MAJOR} toolkit)")
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return "no CUDA sources in csrc/cuda"
    return None


# Headers that torch's own CUDA headers include (ATen/cuda/CUDAContextLight.h), so every CUDA
# extension needs them. A partial toolkit (nvcc and the runtime alone: conda's cuda-nvcc, slim
# images, this project's machines) lacks the libraries' ones, and the build stops at
# "cusparse.h: No such file or directory".
TORCH_CUDA_HEADERS = ("cuda_runtime_api.h", "cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")


def env_dirs(*names):
    """The directories listed in the environment variables `names` (os.pathsep-separated)."""
    return [d for name in names for d in os.environ.get(name, "").split(os.pathsep) if d]


def nvidia_wheel_includes(cuda_major):
    """The include directories of the NVIDIA wheels that a CUDA torch from pip depends on, which
    hold cuBLAS's, cuSPARSE's... headers of torch's own CUDA release: nvidia/cu<major>/include
    (CUDA 13 and later), nvidia/<library>/include (CUDA 12)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += glob.glob(os.path.join(base, f"cu{cuda_major}", "include"))
        if int(cuda_major) < 13:
            found += [d for d in glob.glob(os.path.join(base, "*", "include"))
                      if not re.fullmatch(r"cu\d+", os.path.basename(os.path.dirname(d)))]
    return sorted(d for d in set(found) if os.path.isdir(d))


def headers_from_wheels(cuda_major):
    """The NVIDIA wheels' include directories holding headers of TORCH_CUDA_HEADERS that are in
    none of the places the build looks first (the toolkit's include directories, CUDA_INC_PATH,
    CPATH and the like); [] where none is missing. The build appends them to CPATH, which the
    compilers search after every -I directory (torch's, the toolkit's), so they only fill gaps:
    where a header is in the toolkit, the toolkit's is used."""
    searched = [os.path.join(CUDA_HOME, "include"), *glob.glob(os.path.join(CUDA_HOME, "targets", "*", "include")),
                *env_dirs("CUDA_INC_PATH", "CPATH", "CPLUS_INCLUDE_PATH", "C_INCLUDE_PATH")]
    missing = [h for h in TORCH_CUDA_HEADERS if not any(os.path.isfile(os.path.join(d, h)) for d in searched)]
    return [d for d in nvidia_wheel_includes(cuda_major) if any(os.path.isfile(os.path.join(d, h)) for h in missing)]


def nvcc_release(nvcc):
    """The release `nvcc --version` reports ("13.0"), or None where it says none."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, timeout=120).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    found = re.search(r"release (\d+\.\d+)", out)
    return found and found.group(1)


def cuda_home_source():
    """Where torch's build took CUDA_HOME from, as torch looks (the first that is set or found):
    the CUDA_HOME or CUDA_PATH variable, else the directory above the nvcc on PATH, else
    /usr/local/cuda. For the line that a failed CUDA build ends with (BuildAndRecordTorch.run)."""
    for name in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(name):
            return f"from {name}"
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return "torch's default"
    # An nvcc outside its toolkit, a link or a wrapper script in /usr/local/bin, makes torch take
    # /usr/local, which has no CUDA runtime to link ("cannot find -lcudart"). A link names the toolkit.
    real = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    linked = f", a link into the toolkit at {real}" if real != CUDA_HOME else ""
    return f"the directory above the nvcc on PATH, {nvcc}{linked}"


def announce(what):
    """One line in the build log saying which kernels are built. pip shows a build's output with
    `pip install -v` (or in full when the build fails); grep it for "ncrl_kernels: building"."""
    print(f"ncrl_kernels: {what}", flush=True)


def compiles_openmp():
    """Whether the C++ compiler builds OpenMP code (-fopenmp and <omp.h>): GCC does, LLVM's clang
    with libomp installed does, Apple's clang does not."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "omp.cpp")
        with open(source, "w") as f:
            f.write("#include <omp.h>\nint threads() { return omp_get_max_threads(); }\n")
        command = [*shlex.split(get_cxx_compiler()), "-fopenmp", "-c", source, "-o", os.path.join(tmp, "omp.o")]
        try:
            return subprocess.run(command, capture_output=True, timeout=120).returncode == 0
        except (OSError, subprocess.SubprocessError):
            return False


def takes_msvc_options(compiler):
    """Whether the C++ compiler takes MSVC's options (cl, clang-cl: Windows) rather than GCC's."""
    name = re.split(r"[\\/]", compiler.strip().strip('"'))[-1]
    return os.path.splitext(name)[0].lower() in ("cl", "clang-cl")


def extension():
    sources = sorted(glob.glob("csrc/*.cpp") + glob.glob("csrc/cpu/*.cpp"))
    # -fopenmp at compile time only: at::parallel_for is an OpenMP pragma in ATen's headers, and its
    # runtime symbols resolve to the libgomp that torch itself loads (linking a second one would
    # give two thread pools). A compiler without OpenMP builds them too: parallel_for then runs
    # the CPU kernels on one thread. No -std: torch adds the C++ standard its headers need.
    # MSVC takes neither -O3 nor -fopenmp (it warns and ignores them) and torch adds no
    # optimisation flag of its own there, so it gets /O2, and no OpenMP: which runtime torch's
    # Windows wheels load is not checked here (the Windows build is untested).
    compiler = get_cxx_compiler()
    if takes_msvc_options(compiler):
        cxx, threads = ["/O2"], f"; without OpenMP ({compiler}), so the CPU kernels run on one thread"
    else:
        openmp = compiles_openmp()
        cxx = ["-O3", "-fopenmp"] if openmp else ["-O3"]
        threads = "" if openmp else (f"; without OpenMP, which the C++ compiler {compiler} does not build, "
                                     "so the CPU kernels run on one thread")
    reason = cuda_build_reason()
    if reason is None:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        wheel_includes = headers_from_wheels(TORCH_CUDA_MAJOR)
        if wheel_includes:
            os.environ["CPATH"] = os.pathsep.join([*env_dirs("CPATH"), *wheel_includes])
        headers = f", headers it lacks from {os.pathsep.join(wheel_includes)}" if wheel_includes else ""
        announce(f"building CPU + CUDA kernels (CUDA {torch.version.cuda}, "
                 f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}, toolkit {CUDA_HOME}{headers}{threads})")
        # No --use_fast_math: the loss rows need accurate exp/log1p, and the time goes to cuBLAS.
        nvcc = ["-O3"]
        return CUDAExtension(
            "ncrl_kernels._C",
            sources + sorted(glob.glob("csrc/cuda/*.cu")),
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
        )
    announce(f"building CPU-only kernels ({reason}{threads})")
    return CppExtension("ncrl_kernels._C", sources, extra_compile_args={"cxx": cxx})


class BuildAndRecordTorch(BuildExtension):
    """torch's BuildExtension, then _build_info.py written next to the compiled _C (in the source
    tree for editable installs, in the build directory for wheels): the torch version it was
    compiled against and, for a CUDA build, the architectures its device code is for."""

    def finalize_options(self):
        super().finalize_options()
        # Always compile (ninja keeps it incremental): without ninja, setuptools would keep a _C
        # newer than its sources, built for another torch, under a new record.
        self.force = True

    def run(self):
        built_cuda = any(source.endswith(".cu") for ext in self.extensions for source in ext.sources)
        try:
            super().run()
        except Exception:
            if built_cuda:
                # Compiler errors name no toolkit; say which one torch took, and the two ways out.
                print(f"ncrl_kernels: the CUDA build failed with the toolkit at {CUDA_HOME} ({cuda_home_source()}). "
                      f"Where that is not a full CUDA {TORCH_CUDA_MAJOR} toolkit (bin/nvcc, include/, "
                      "lib64/libcudart.so), set CUDA_HOME to one and build again; or set NCRL_KERNELS_CPU_ONLY=1 "
                      "to build the CPU kernels only.", file=sys.stderr, flush=True)
            raise
        path = os.path.join(os.path.dirname(self.get_ext_fullpath("ncrl_kernels._C")), "_build_info.py")
        cuda_archs = os.environ.get("TORCH_CUDA_ARCH_LIST") if built_cuda else None
        with open(path, "w") as f:
            f.write('"""Written by setup.py: the torch that ncrl_kernels._C was compiled against, and the\n'
                    'TORCH_CUDA_ARCH_LIST of its CUDA kernels (None: none built)."""\n'
                    f"TORCH_VERSION = {torch.__version__!r}\nCUDA_ARCHS = {cuda_archs!r}\n")


def license_metadata():
    """MIT, as a PEP 639 license expression where setuptools takes one (77 and newer, which warn that
    the older `license = {text = ...}` table stops working after 2027-02-18), else as the plain
    text field: torch 2.13 and 2.14 require setuptools >= 77.0.3, but the 70.1 that pyproject.toml
    allows builds too (torch 2.11, on the GPU machine, whose setuptools is not known here)."""
    major = int(setuptools.__version__.split(".")[0])
    return {"license_expression": "MIT"} if major >= 77 else {"license": "MIT"}


def torch_requirement():
    """The torch this package needs: for a wheel (also the one pip builds for `pip install .`), the
    torch it is compiled against, the only one its extension loads with (ncrl_kernels._extension
    compares the full version, build tag included), so that installing it elsewhere does not pull
    another torch (on Linux, a CUDA build of several GB) to run the reference with; for an sdist,
    compiled where it is installed, any torch it supports. The pin is the version pip knows the
    installed torch by: "2.13.0+cpu" for PyTorch's CPU build, which "==2.13.0" would let PyPI's
    CUDA build of 2.13.0 satisfy, and "2.14.1" for PyPI's own (its torch.__version__ says
    "2.14.1+cu130", which no index lists)."""
    if "sdist" in sys.argv[1:]:
        return "torch>=2.11"
    try:
        return f"torch=={importlib.metadata.version('torch')}"
    except importlib.metadata.PackageNotFoundError:  # a torch built and put on the path by hand
        return f"torch=={torch.__version__}"


setup(
    **license_metadata(),
    install_requires=[torch_requirement()],
    packages=["ncrl_kernels", "ncrl_kernels.triton_kernels"],
    package_dir={"ncrl_kernels.triton_kernels": "triton_kernels"},
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildAndRecordTorch},
)
