"""Compile-and-link check of the CUDA kernels on a machine without a GPU (`make check-cuda-build`).

Run it with the Python of a venv holding a CUDA build of torch (the Makefile's .venv-cuda). It

1. builds a wheel of this project with pip, with nvcc from CUDA_HOME (default /usr/local/cuda), a
   partial toolkit on this project's machines: the headers it lacks that torch's CUDA headers
   include (cuSPARSE's, cuBLAS's...), setup.py takes from torch's NVIDIA wheels
   (nvidia/cu<major>/include), as it would for a user (nothing here sets CPATH);
2. checks that the build log says it built the CUDA kernels;
3. installs the wheel into the venv and, in a fresh interpreter outside the source tree, checks that
   the extension loads and registered CPU and CUDA kernels for every operator;
4. checks with cuobjdump that the library holds a cubin for every architecture of
   TORCH_CUDA_ARCH_LIST (setup.py's default when unset) and PTX for the "+PTX" ones;
5. checks that the bf16/fp16 path is 16-bit end to end: the device code has the bf16 and fp16
   instantiations of the feature and gradient kernels, and the library calls ATen's `mm.dtype_out`
   (the GEMM of 16-bit operands with fp32 output; csrc/cuda calls it only with 16-bit operands);
6. checks that setup.py builds the CPU kernels only, saying why, where the toolkit's CUDA major
   version is not torch's (a pretend nvcc of another release), where torch's build would fail;
7. checks that a CUDA build that fails (a pretend nvcc of torch's release that compiles nothing)
   ends with setup.py's line naming the toolkit torch took, where from, and the way out.

Nothing runs on a GPU. The full build log is <venv>/ncrl-cuda-build.log; the build objects stay in
build/ so a second run only recompiles what changed. Exits non-zero saying what failed.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
VENV = sys.prefix
OPS = ("head_forward", "head_backward", "loss_forward", "fused_forward")
DEFAULT_ARCHS = "8.0;9.0+PTX"  # setup.py's default


def fail(message):
    sys.exit(f"check-cuda-build: FAILED: {message}")


def build_env(torch_cuda):
    env = dict(os.environ)
    cuda_home = env.setdefault("CUDA_HOME", "/usr/local/cuda")
    if not os.path.exists(os.path.join(cuda_home, "bin", "nvcc")):
        fail(f"no nvcc in CUDA_HOME={cuda_home}; set CUDA_HOME to a CUDA {torch_cuda} toolkit")
    env["PATH"] = os.path.join(cuda_home, "bin") + os.pathsep + env.get("PATH", "")
    env.setdefault("MAX_JOBS", "2")
    env.pop("NCRL_KERNELS_CPU_ONLY", None)
    return env


def build_wheel(env):
    dist = os.path.join(VENV, "ncrl-cuda-dist")
    shutil.rmtree(dist, ignore_errors=True)
    log_path = os.path.join(VENV, "ncrl-cuda-build.log")
    cmd = [sys.executable, "-m", "pip", "wheel", "-v", "--no-build-isolation", "--no-deps", "-w", dist, ROOT]
    print(f"check-cuda-build: building (CUDA_HOME={env['CUDA_HOME']}, MAX_JOBS={env['MAX_JOBS']}); log: {log_path}",
          flush=True)
    with open(log_path, "w") as log:
        result = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    with open(log_path) as log:
        text = log.read()
    if result.returncode != 0:
        print(text[-6000:])
        fail(f"the build failed (exit {result.returncode}); full log in {log_path}")
    announced = sorted(set(re.findall(r"ncrl_kernels: building .*", text)))
    for line in announced:
        print(f"check-cuda-build: build log: {line}")
    if not any("CUDA kernels" in line for line in announced):
        fail(f"setup.py did not build the CUDA kernels (see the line above and {log_path})")
    wheels = glob.glob(os.path.join(dist, "ncrl_kernels-*.whl"))
    if len(wheels) != 1:
        fail(f"expected one wheel in {dist}, found {wheels}")
    return wheels[0]


def installed_extension(wheel):
    """Install the wheel and load it in a fresh interpreter outside the source tree (so that the
    in-tree package cannot shadow it); returns what that interpreter saw."""
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel], check=True)
    probe = f"""
import json, sys, torch
from ncrl_kernels import _extension
missing = [f"{{op}} ({{key}})" for op in {OPS!r} for key in ("CPU", "CUDA")
           if _extension.LOAD_ERROR is not None
           or not torch._C._dispatch_has_kernel_for_dispatch_key("ncrl_kernels::" + op, key)]
print(json.dumps({{"load_error": _extension.LOAD_ERROR, "missing": missing, "torch": torch.__version__,
                  "library": getattr(sys.modules.get("ncrl_kernels._C"), "__file__", None)}}))
"""
    with tempfile.TemporaryDirectory() as outside:
        result = subprocess.run([sys.executable, "-c", probe], cwd=outside, capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"importing the installed package failed:\n{result.stderr[-3000:]}")
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    if seen["load_error"] is not None:
        fail(f"the installed extension does not load: {seen['load_error']}")
    if seen["missing"]:
        fail(f"operators without a kernel: {', '.join(seen['missing'])}")
    return seen


def find_cuobjdump(env):
    """cuobjdump of the toolkit, else on PATH, else the copy that ships in Triton's wheel (a
    dependency of CUDA torch; minimal toolkits lack cuobjdump)."""
    candidates = [os.path.join(env["CUDA_HOME"], "bin", "cuobjdump"), shutil.which("cuobjdump", path=env["PATH"])]
    try:
        import triton

        candidates.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"))
    except ImportError:
        pass
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    fail("no cuobjdump (not in CUDA_HOME/bin, on PATH or in triton); install nvidia-cuda-cuobjdump")


def cuobjdump_output(cuobjdump, option, library):
    result = subprocess.run([cuobjdump, option, library], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"cuobjdump {option} {library} failed: {result.stderr.strip()}")
    return result.stdout


def check_device_code(library, env):
    """A cubin per requested architecture, PTX for the '+PTX' ones, and every __global__ kernel of
    csrc/cuda in the device code; returns the device code found ("sm_80 cubin", ...), the kernels and
    the device code's symbols."""
    cuobjdump = find_cuobjdump(env)
    listing = cuobjdump_output(cuobjdump, "--list-elf", library) + cuobjdump_output(cuobjdump, "--list-ptx", library)
    found = sorted(set(re.findall(r"\.(sm_\w+)\.(cubin|ptx)\b", listing)))
    wanted = []
    for entry in re.split(r"[;\s]+", env.get("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCHS).strip()):
        match = re.fullmatch(r"(\d+)\.(\d+)([a-z]?)(\+PTX)?", entry)
        if match is None:
            continue  # a named arch ("Hopper"): torch expands it; at least one cubin is still required
        arch = "sm_" + match.group(1) + match.group(2) + match.group(3)
        wanted.append((arch, "cubin"))
        if match.group(4):
            wanted.append((arch, "ptx"))
    missing = [" ".join(code) for code in wanted if code not in found]
    if missing or not any(kind == "cubin" for _, kind in found):
        fail(f"device code missing in {library}: {missing or 'no cubin at all'}\n{listing}")
    symbols = cuobjdump_output(cuobjdump, "--dump-elf-symbols", library)
    kernels = set()
    for source in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        with open(source) as f:
            kernels.update(re.findall(r"__global__\s+void\s+(\w+)", f.read()))
    absent = sorted(k for k in kernels if k not in symbols)
    if not kernels or absent:
        fail(f"kernels of csrc/cuda missing from the device code: {absent or 'none found in the sources'}")
    return [" ".join(code) for code in found], sorted(kernels), symbols


# Mangled-name fragments of the 16-bit kernel instantiations (Itanium ABI: c10::BFloat16, c10::Half;
# the gradient kernel's second argument is its fp32 accumulation type, `f`).
SIXTEEN_BIT_KERNELS = {
    "build_features_kernel<c10::BFloat16>": "build_features_kernelIN3c108BFloat16EE",
    "build_features_kernel<c10::Half>": "build_features_kernelIN3c104HalfEE",
    "reduce_feature_grads_kernel<c10::BFloat16, float>": "reduce_feature_grads_kernelIN3c108BFloat16EfE",
    "reduce_feature_grads_kernel<c10::Half, float>": "reduce_feature_grads_kernelIN3c104HalfEfE",
}
SIXTEEN_BIT_GEMM = "at::_ops::mm_dtype_out::call("


def check_sixteen_bit_path(library, symbols):
    """The 16-bit instantiations of the head kernels in the device code (`symbols`, from
    check_device_code), and the 16-bit-operand, fp32-output GEMM among the library's imports
    (nm -D, demangled)."""
    absent = [name for name, mangled in SIXTEEN_BIT_KERNELS.items() if mangled not in symbols]
    if absent:
        fail(f"16-bit kernel instantiations missing from the device code: {absent}")
    result = subprocess.run(["nm", "-DC", "--undefined-only", library], capture_output=True, text=True)
    if result.returncode != 0:
        fail(f"nm -DC {library} failed: {result.stderr.strip()}")
    if SIXTEEN_BIT_GEMM not in result.stdout:
        fail(f"{library} does not call ATen's 16-bit GEMM with fp32 output ({SIXTEEN_BIT_GEMM}...)")
    return sorted(SIXTEEN_BIT_KERNELS) + ["at::mm(out_dtype=float32)"]


def setup_announces(env):
    """The line setup.py announces ("ncrl_kernels: building ...") in environment `env`."""
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, capture_output=True, text=True, env=env)
    announced = re.findall(r"ncrl_kernels: building .*", result.stdout)
    return announced[0] if result.returncode == 0 and announced else result.stdout[-2000:] + result.stderr[-2000:]


def pretend_toolkit(directory, release, compiles):
    """A CUDA_HOME in `directory` whose bin/nvcc reports `release` and, unless `compiles`, fails
    every other call; returns the environment for setup.py with CUDA_HOME set to it."""
    os.makedirs(os.path.join(directory, "bin"))
    nvcc = os.path.join(directory, "bin", "nvcc")
    with open(nvcc, "w") as f:
        f.write(f"#!/bin/sh\necho 'Cuda compilation tools, release {release}, V{release}.89'\n")
        if not compiles:
            f.write('[ "$1" = --version ] || { echo "pretend nvcc: compiles nothing" >&2; exit 1; }\n')
    os.chmod(nvcc, 0o755)
    env = {k: v for k, v in os.environ.items() if k != "NCRL_KERNELS_CPU_ONLY"}
    return dict(env, CUDA_HOME=directory)


def check_toolkit_mismatch(torch_cuda):
    """What setup.py announces with a CUDA_HOME whose nvcc reports another major release than
    torch's CUDA: it must build the CPU kernels only (torch's build refuses such a toolkit)."""
    other = f"{int(torch_cuda.split('.')[0]) - 1}.8"
    with tempfile.TemporaryDirectory() as toolkit:
        line = setup_announces(pretend_toolkit(toolkit, other, compiles=True))
    if "CPU-only" not in line or other not in line:
        fail(f"with a CUDA {other} toolkit and torch's CUDA {torch_cuda}, setup.py should build the CPU kernels "
             f"only and say why; it said {line}")
    return line


def check_failed_build_hint(torch_cuda):
    """The last word of a CUDA build that fails (here at its first nvcc call, so it is quick):
    setup.py's line naming the toolkit torch took and where from, and the way out."""
    with tempfile.TemporaryDirectory() as work:
        toolkit = os.path.join(work, "toolkit")
        env = pretend_toolkit(toolkit, torch_cuda, compiles=False)
        build = os.path.join(work, "build")
        result = subprocess.run([sys.executable, "setup.py", "build_ext", "--build-temp", build, "--build-lib", build],
                                cwd=ROOT, capture_output=True, text=True, env=dict(env, MAX_JOBS="1"))
    output = result.stdout + result.stderr
    hint = re.findall(r"ncrl_kernels: the CUDA build failed .*", output)
    if result.returncode == 0 or not hint or toolkit not in hint[0] or "from CUDA_HOME" not in hint[0] \
            or "NCRL_KERNELS_CPU_ONLY=1" not in hint[0]:
        fail(f"a CUDA build that fails should end saying which toolkit torch took (CUDA_HOME={toolkit}) and the "
             f"way out; exit {result.returncode}, output:\n{output[-3000:]}")
    return hint[0]


def main():
    import torch

    if torch.version.cuda is None:
        fail(f"{sys.executable} has torch {torch.__version__}, a CPU build; run it in a venv with a CUDA torch")
    env = build_env(torch.version.cuda)
    wheel = build_wheel(env)
    seen = installed_extension(wheel)
    code, kernels, symbols = check_device_code(seen["library"], env)
    sixteen_bit = check_sixteen_bit_path(seen["library"], symbols)
    print(f"check-cuda-build: with another CUDA major version: {check_toolkit_mismatch(torch.version.cuda)}")
    print(f"check-cuda-build: a failed CUDA build: {check_failed_build_hint(torch.version.cuda)}")
    print(f"check-cuda-build: OK: {os.path.basename(wheel)} against torch {seen['torch']}; "
          f"{len(OPS)} operators registered for CPU and CUDA; device code: {', '.join(code)}; "
          f"kernels: {', '.join(kernels)}; 16-bit path: {', '.join(sixteen_bit)}. "
          "Compiled and linked only: no kernel was run.")


if __name__ == "__main__":
    main()
