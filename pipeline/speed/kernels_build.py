"""Building the fused conv kernels (`csrc/`): one library per instruction-set variant.

Each variant is compiled from the same sources with its own ISA flags, vector width and
register budget (`VARIANTS`), under its own extension name and torch.ops namespace
(`torch.ops.lenet_avx2`, ...), so that several can be loaded in one process. `load(variant)`
builds it with torch's C++ extension tooling the first time (about 20 s; a C++ compiler is
needed, and ninja, which the project depends on) into torch's extension cache
(`TORCH_EXTENSIONS_DIR`, else torch's default: `$XDG_CACHE_HOME/torch_extensions`, by default
`~/.cache/torch_extensions`), one build per torch installation and variant, and loads it from
there afterwards. A failed build is remembered there (`build-failed.txt`, with the compiler's
output) and not tried again until that file is deleted or the compiler (CXX), the sources or
torch change; ranks starting together build once, the others wait for it (`exclusive`). The
kernels compile with the OpenMP flags this compiler takes (probed once per compiler), or
without OpenMP, for one thread, where it takes none.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock, Timeout

from pipeline.atomic import write_atomic
from pipeline.errors import describe

log = logging.getLogger(__name__)

CSRC = Path(__file__).with_name("csrc")


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: its name (in the build's and the ops' names), a label for
    people, the float lanes of a vector, the vector registers its blocking may keep live, and
    the compiler flags of its instruction set."""

    name: str
    label: str
    lanes: int
    registers: int
    flags: tuple[str, ...]


# Instruction sets to compile for, from the narrowest: a build runs only where torch's own
# reading of the CPU is at least its instruction set (clusters share home directories).
_ISA_FLAGS = {
    "portable": (),
    "avx2": ("-mavx2", "-mfma"),
    "avx512": ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma"),
}
VARIANTS = {
    "portable": Variant("portable", "portable", 4, 16, _ISA_FLAGS["portable"]),
    "avx2": Variant("avx2", "AVX2", 8, 16, _ISA_FLAGS["avx2"]),
    "avx512": Variant("avx512", "AVX-512", 16, 32, _ISA_FLAGS["avx512"]),
}
_TORCH_ISA = {"AVX2": "avx2", "AVX512": "avx512"}  # torch's capability names; others: portable

# Files in a build directory next to torch's (build.ninja, objects, the library).
FAILED = "build-failed.txt"  # why the last build failed, for the build it names
_OPENMP_CACHE = "openmp.json"  # the OpenMP flags found for a compiler
_BUILT = "built.json"  # which build the library there is
_LOCK = "build.lock"


def cpu_variant() -> str:
    """The widest variant this CPU runs, by torch's reading of it (ATEN_CPU_CAPABILITY=avx2
    makes an AVX-512 CPU an AVX2 one, for torch and for the kernels alike)."""
    return _TORCH_ISA.get(torch.backends.cpu.get_cpu_capability(), "portable")


def runs_here(variant: str) -> bool:
    order = list(VARIANTS)
    return order.index(variant) <= order.index(cpu_variant())


def namespace(variant: str) -> str:
    return f"lenet_{variant}"  # torch.ops.<namespace>.conv1_pool_relu, ...


def build_name(variant: str) -> str:
    """One name per variant, torch version and torch installation: environments that share a
    home directory never rebuild over each other's kernels."""
    version = re.sub(r"\W", "_", torch.__version__)
    install = hashlib.sha1(str(Path(torch.__file__).resolve().parent).encode()).hexdigest()[:8]
    return f"lenet_conv_pool_relu_{variant}_torch{version}_{install}"


def build_dir(variant: str) -> Path:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        from torch.utils.cpp_extension import get_default_build_root  # honours XDG_CACHE_HOME

        root = get_default_build_root()
    return Path(root) / build_name(variant)


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
    found = read_json(cache)
    if found.get("compiler") == _compiler_id():
        return OpenMP(found["cflags"], found["ldflags"], found["note"])
    result = _probe_openmp(directory)
    write_atomic(cache, json.dumps({"compiler": _compiler_id(), **result.__dict__}, indent=1))
    return result


def _cflags(variant: Variant, omp: OpenMP) -> list[str]:
    return [
        "-O3",
        *omp.cflags,
        *variant.flags,
        f"-DLENET_LANES={variant.lanes}",
        f"-DLENET_REGS={variant.registers}",
        f"-DLENET_NS={namespace(variant.name)}",
    ]


def build_key(cflags: list[str], ldflags: list[str]) -> str:
    """What a library depends on: sources, flags, compiler, torch installation."""
    h = hashlib.sha1()
    for source in sorted(CSRC.iterdir()):
        if source.suffix in (".cpp", ".h"):
            h.update(source.name.encode() + b"\0" + source.read_bytes() + b"\0")
    parts = [cflags, ldflags, _compiler_id(), torch.__version__, torch.__file__]
    h.update(json.dumps(parts).encode())
    return h.hexdigest()


def read_json(path: Path) -> dict:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


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
def exclusive(directory: Path) -> Iterator[None]:
    """One process at a time in a build directory (the ranks of a run start together): the
    first builds (or measures), the others then load its library or read its result. The OS
    drops the lock if its holder dies."""
    lock = FileLock(directory / _LOCK)
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.info(
            "waiting for another process building or timing the fused conv kernels in %s", directory
        )
        lock.acquire()
    try:
        # torch's own lock file: a build killed mid-way leaves it behind, and every later
        # start would wait on it forever. Holding our lock, nobody else builds here now.
        (directory / "lock").unlink(missing_ok=True)
        yield
    finally:
        lock.release()


def loaded(variant: str) -> bool:
    return hasattr(getattr(torch.ops, namespace(variant)), "conv2_pool_relu")


def load(variant: str) -> str | None:
    """Build (once) and load `variant`; None when it is ready, else why it is not.

    A failed build is remembered in the build directory (FAILED) and not tried again until
    that file is deleted or what the build depends on changes: the sources, the flags, the
    compiler (CXX) or torch."""
    if loaded(variant):
        return None
    problem = toolchain_problem()
    if problem:
        return f"{problem}; or set train.fused_conv=false"
    directory = build_dir(variant)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with exclusive(directory):
            problem = _build(VARIANTS[variant], directory)
    except OSError as e:  # the build directory itself: not writable, disk full
        problem = f"{describe(e)} (set TORCH_EXTENSIONS_DIR to a writable directory)"
    return f"{problem}; or set train.fused_conv=false" if problem else None


def library_key(variant: str) -> str | None:
    """The build key of the library `variant` has in its build directory, if any."""
    return read_json(build_dir(variant) / _BUILT).get("key")


def _build(variant: Variant, directory: Path) -> str | None:
    omp = openmp(directory)
    cflags = _cflags(variant, omp)
    key = build_key(cflags, omp.ldflags)
    marker = directory / FAILED
    reason = _remembered_failure(marker, key)
    if reason is not None:
        return f"{reason} (remembered: an earlier build failed; delete {marker} to retry)"
    from torch.utils.cpp_extension import load as load_extension

    name = build_name(variant.name)
    built = read_json(directory / _BUILT).get("key") == key  # the library there is this one
    fresh = not built or not (directory / f"{name}.so").exists()
    if fresh:
        log.info(
            "building the fused conv kernels (%s) into %s (once, about 20 s)%s",
            variant.label,
            directory,
            omp.note,
        )
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
        write_atomic(marker, f"{header}\n{e}\n")  # the compiler's output after the header
        return f"{reason} (not tried again until {marker} is deleted or CXX changes)"
    marker.unlink(missing_ok=True)
    write_atomic(directory / _BUILT, json.dumps({"key": key}))
    if fresh:
        log.info("built the fused conv kernels in %.1f s", time.perf_counter() - started)
    return None
