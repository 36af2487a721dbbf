"""Fused CPU kernels for LeNet's two stages: relu(max_pool2d(conv(x), 2)), each in one pass.

`load()` builds `pipeline/csrc/` with torch's C++ extension tooling the first time (about
20 s; a C++ compiler is needed, and ninja, which the project depends on) into torch's
extension cache (`TORCH_EXTENSIONS_DIR`, by default `~/.cache/torch_extensions`), one build
per torch installation and CPU instruction set, and loads it from there afterwards. A failed
build is remembered there (`build-failed.txt`, with the compiler's output) and not tried again
until that file is deleted or the compiler (CXX), the sources or torch change; ranks starting
together build once, the others wait for it. The kernels compile with the OpenMP flags this
compiler takes (probed once per compiler), or without OpenMP, for one thread, where it takes
none.
`conv_pool_relu` is what `LeNet` calls for each stage when the kernels are attached: it gives
the values and gradients of torch's three ops (up to float rounding) and falls back to those
ops wherever a kernel does not apply: another device, dtype or shape, torch.compile tracing,
conv1's input needing its own gradient. Under bf16 autocast the kernels still run, in fp32 (the
next layer casts their output): on LeNet that is faster than torch's bf16 ops, and no less
precise.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from pipeline.errors import describe
from pipeline.model import conv_pool_relu as torch_conv_pool_relu

CSRC = Path(__file__).with_name("csrc")
# Instruction sets to compile for, by torch's own reading of this CPU: a build cached for one
# CPU never runs on another that lacks its instructions (clusters share home directories).
_ISA_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
# Files in the build directory next to torch's (build.ninja, objects, the library).
FAILED = "build-failed.txt"  # why the last build failed, for the build it names
_OPENMP_CACHE = "openmp.json"  # the OpenMP flags found for a compiler
_BUILT = "built.json"  # which build the library there is
_LOCK = "build.lock"


def _isa() -> str:
    return torch.backends.cpu.get_cpu_capability()


def wanted(setting: str | bool) -> bool:
    """Whether `train.fused_conv` (auto, true, false) asks for the kernels on this CPU. auto:
    where torch's vector ISA is AVX-512; with AVX2 the kernels are slower than torch's ops
    (MNIST with configs/cpu.yaml, one process: 2.4x slower on AVX2, 2.3x faster on AVX-512)."""
    setting = str(setting).lower()  # the configs of older checkpoints hold a bool
    return setting == "true" or (setting == "auto" and _isa() == "AVX512")


def build_name() -> str:
    """One name per torch version, torch installation and CPU instruction set: environments
    that share a home directory never rebuild over each other's kernels."""
    version = re.sub(r"\W", "_", torch.__version__)
    install = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    return f"lenet_conv_pool_relu_{_isa().lower()}_torch{version}_{install}"


def build_dir() -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or Path.home() / ".cache" / "torch_extensions"
    return Path(root) / build_name()


def compiler() -> str:
    return os.environ.get("CXX", "c++")  # what torch's extension tooling compiles with


def toolchain_problem() -> str | None:
    """Why the kernels cannot be built here (no compiler, no ninja), or None."""
    if shutil.which(compiler()) is None:
        return f"no C++ compiler ({compiler()}) on PATH"
    if shutil.which("ninja") is None:
        try:
            import ninja  # the PyPI wheel: its binary is not on PATH outside an activated venv
        except ImportError:
            return "ninja is not installed (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def _compiler_id() -> list:
    """The compiler as a build depends on it, without running it: CXX, the file it resolves
    to, and that file's size and time (an upgrade in place changes them)."""
    path = os.path.realpath(shutil.which(compiler()) or compiler())
    try:
        st = os.stat(path)
    except OSError:
        return [compiler(), path]
    return [compiler(), path, st.st_size, st.st_mtime_ns]


@dataclass(frozen=True)
class OpenMP:
    """Compile and link flags for the kernels' threads, and a note for the build's info line
    ("" where nothing needs saying)."""

    cflags: list[str]
    ldflags: list[str]
    note: str = ""


# The kernels thread with at::parallel_for. With torch's OpenMP backend that is a `#pragma omp
# parallel` inlined from ATen's headers into the kernels' own code: without the compiler's
# OpenMP flag it compiles to a serial loop (correct, one thread). torch's extension tooling
# adds no OpenMP flag. Candidates, each (compile flags, link flags):
_OPENMP_CANDIDATES = [
    # GCC: the GOMP_* calls resolve, when loaded, to the runtime torch itself loaded and
    # sizes with torch.set_num_threads (linking -fopenmp could add a second copy).
    (["-fopenmp"], []),
    # LLVM clang: its calls (__kmpc_*) need LLVM's runtime, which torch's GNU one lacks.
    (["-fopenmp"], ["-fopenmp"]),
    # Apple's clang: OpenMP through the preprocessor only, and libomp linked by name (macOS
    # torch wheels ship it in torch/lib, on the extension's library path).
    (["-Xpreprocessor", "-fopenmp"], ["-lomp"]),
]
_OPENMP_PROBE = """\
#include <omp.h>
#ifndef _OPENMP
#error "no OpenMP"
#endif
int lenet_openmp_probe() {
  int n = 0;
#pragma omp parallel
  {
#pragma omp single
    n = omp_get_num_threads();
  }
  return n;
}
"""


def _succeeds(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _probe_openmp(directory: Path) -> OpenMP:
    """The first candidate with which a tiny OpenMP library compiles, links and loads here."""
    torch_dir = Path(torch.__file__).resolve().parent
    with tempfile.TemporaryDirectory(dir=directory, prefix="openmp-probe-") as tmp:
        source = Path(tmp) / "probe.cpp"
        source.write_text(_OPENMP_PROBE)
        for i, (cflags, ldflags) in enumerate(_OPENMP_CANDIDATES):
            obj, lib = Path(tmp) / f"probe{i}.o", Path(tmp) / f"probe{i}.so"
            compile_cmd = [compiler(), *cflags, "-fPIC", f"-I{torch_dir / 'include'}", "-c"]
            link_cmd = [compiler(), "-shared", str(obj), "-o", str(lib), f"-L{torch_dir / 'lib'}"]
            if _succeeds([*compile_cmd, str(source), "-o", str(obj)]) and _succeeds(
                [*link_cmd, *ldflags]
            ):
                try:
                    ctypes.CDLL(str(lib))  # its OpenMP calls resolve here, with torch loaded
                except OSError:
                    continue
                return OpenMP(cflags, ldflags)
    tried = " nor ".join(dict.fromkeys(" ".join(c) for c, _ in _OPENMP_CANDIDATES))
    note = f" without OpenMP: they will run on one thread ({compiler()} takes neither {tried})"
    return OpenMP([], [], note)


def openmp(directory: Path) -> OpenMP:
    """The OpenMP flags for the kernels with this compiler: probed once per compiler, then read
    from the build directory."""
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return OpenMP([], [])  # torch's native thread pool: parallel_for calls into libtorch
    cache = directory / _OPENMP_CACHE
    found = _read_json(cache)
    if found.get("compiler") == _compiler_id():
        return OpenMP(found["cflags"], found["ldflags"], found["note"])
    result = _probe_openmp(directory)
    record = {"compiler": _compiler_id(), **result.__dict__}
    _write_atomic(cache, json.dumps(record, indent=1))
    return result


def _build_key(cflags: list[str], ldflags: list[str]) -> str:
    """What the library depends on: sources, flags, compiler, torch installation."""
    h = hashlib.sha1()
    for source in sorted(CSRC.iterdir()):
        if source.suffix in (".cpp", ".h"):
            h.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    parts = [cflags, ldflags, _compiler_id(), torch.__version__, torch.__file__]
    h.update(json.dumps(parts).encode())
    return h.hexdigest()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_atomic(path: Path, text: str) -> None:
    """Readers see the old file or the new one, never part of one."""
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.name, delete=False) as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(f.name, 0o644)  # not the temporary file's 0600: the cache may be shared
    os.replace(f.name, path)


def _remembered_failure(marker: Path, key: str) -> str | None:
    """The reason recorded in `marker` for the build `key`, or None."""
    try:
        header = marker.read_text().split("\n\n", 1)[0].splitlines()
    except OSError:
        return None
    fields = dict(line.split(": ", 1) for line in header if ": " in line)
    return fields.get("reason") if fields.get("key") == key else None


def _failure_reason(e: Exception) -> str:
    """One line: the exception's first, up to the command torch puts there, and the compiler's
    first error if there is one (the whole output goes into the FAILED file)."""
    head = describe(e, limit=10_000).split(": [1/", 1)[0]
    lines = str(e).splitlines()[1:]
    error = next((line.strip() for line in lines if re.search(r"\berror\b", line)), None)
    return describe(RuntimeError(f"{head}: {error}" if error else head), limit=300)


@contextmanager
def _exclusive(path: Path, info: Callable[[str], None]) -> Iterator[None]:
    """One process at a time (the ranks of a run start together): the first builds, the others
    then load its library or read its failure. The OS drops the lock if its holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: torch's own lock file still guards the build itself
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info(f"waiting for another process to build the fused conv kernels in {path.parent}")
            fcntl.flock(f, fcntl.LOCK_EX)
        # torch's own lock file: a build killed mid-way leaves it behind, and every later
        # start would wait on it forever. Holding our lock, nobody else builds here now.
        (path.parent / "lock").unlink(missing_ok=True)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load(info: Callable[[str], None] = lambda _: None) -> str | None:
    """Build (once) and load the kernels; None when they are ready, else why they are not.

    A failed build is remembered in the build directory (FAILED) and not tried again until
    that file is deleted or what the build depends on changes: the sources, the flags, the
    compiler (CXX) or torch."""
    if hasattr(torch.ops.lenet, "conv2_pool_relu"):
        return None
    problem = toolchain_problem()
    if problem:
        return f"{problem}; or set train.fused_conv=false"
    directory = build_dir()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with _exclusive(directory / _LOCK, info):
            problem = _build(directory, info)
    except OSError as e:  # the build directory itself: not writable, disk full
        problem = f"{describe(e)} (set TORCH_EXTENSIONS_DIR to a writable directory)"
    return f"{problem}; or set train.fused_conv=false" if problem else None


def _build(directory: Path, info: Callable[[str], None]) -> str | None:
    omp = openmp(directory)
    cflags = ["-O3", *omp.cflags, *_ISA_FLAGS.get(_isa(), [])]
    key = _build_key(cflags, omp.ldflags)
    marker = directory / FAILED
    reason = _remembered_failure(marker, key)
    if reason is not None:
        return f"{reason} (remembered: an earlier build failed; delete {marker} to retry)"
    from torch.utils.cpp_extension import load as load_extension

    name = build_name()
    built = _read_json(directory / _BUILT).get("key") == key  # the library there is this one
    fresh = not built or not (directory / f"{name}.so").exists()
    if fresh:
        info(f"building the fused conv kernels into {directory} (once, about 20 s){omp.note}")
    started = time.perf_counter()
    try:
        load_extension(
            name=name,
            sources=[str(s) for s in sorted(CSRC.glob("*.cpp"))],
            build_directory=str(directory),
            extra_cflags=cflags,
            extra_ldflags=omp.ldflags,
            is_python_module=False,
        )
    except Exception as e:  # noqa: BLE001 - any build or load failure means: use torch's ops
        reason = _failure_reason(e)
        header = f"key: {key}\nreason: {reason}\ncompiler: {compiler()}\n"
        _write_atomic(marker, f"{header}\n{e}\n")  # the compiler's output after the header
        return f"{reason} (not tried again until {marker} is deleted or CXX changes)"
    marker.unlink(missing_ok=True)
    _write_atomic(directory / _BUILT, json.dumps({"key": key}))
    if fresh:
        info(f"built the fused conv kernels in {time.perf_counter() - started:.1f} s")
    return None


class _Conv1PoolReLU(torch.autograd.Function):
    """conv1 (1 -> 6): the input's gradient is never needed, only the weight's and bias's."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y, code = torch.ops.lenet.conv1_pool_relu(x, weight, bias)
        ctx.save_for_backward(code, x)
        ctx.kernel_size = weight.shape[-1]
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        code, x = ctx.saved_tensors
        grad_w, grad_b = torch.ops.lenet.conv1_pool_relu_backward(grad_y, code, x, ctx.kernel_size)
        return None, grad_w, grad_b


class _Conv2PoolReLU(torch.autograd.Function):
    """conv2 (6 -> 16): gradients of the input, the weight and the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        y, code = torch.ops.lenet.conv2_pool_relu(x, weight, bias)
        ctx.save_for_backward(code, x, weight)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        code, x, weight = ctx.saved_tensors
        return tuple(torch.ops.lenet.conv2_pool_relu_backward(grad_y, code, x, weight))


def _kernel(conv: nn.Conv2d, x: torch.Tensor) -> type[torch.autograd.Function] | None:
    """The kernel for this stage and input, or None where torch's ops must run."""
    w = conv.weight
    plain = (
        x.device.type == "cpu"
        and x.dtype == w.dtype == torch.float32
        and x.dim() == 4
        and conv.bias is not None
        and conv.stride == (1, 1)
        and conv.padding == (0, 0)
        and conv.dilation == (1, 1)
        and conv.groups == 1
        and w.shape[-1] == w.shape[-2] in (3, 5)
        and min(x.shape[2:]) > w.shape[-1]
        and not torch.compiler.is_compiling()
    )
    if not plain:
        return None
    if w.shape[:2] == (6, 1) and x.shape[3] <= 32 and not x.requires_grad:
        return _Conv1PoolReLU
    if w.shape[:2] == (16, 6):
        return _Conv2PoolReLU
    return None


def conv_pool_relu(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """relu(max_pool2d(conv(x), 2)): a fused kernel where one applies, torch's ops elsewhere."""
    kernel = _kernel(conv, x)
    if kernel is None:
        return torch_conv_pool_relu(conv, x)
    return kernel.apply(x, conv.weight, conv.bias)
