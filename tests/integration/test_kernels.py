"""The fused conv -> max-pool -> ReLU CPU kernels give torch's values and gradients, in every
instruction-set build this CPU runs: exactly where float sums are exact (integer data, full of
ties), to rounding elsewhere; NaN spreads as in torch; they fall back to torch's ops where they
do not apply; `auto` trains on whichever path is faster here, timed once and remembered; a
machine that cannot build them trains with torch's ops after one warning, and does not try
again at the next start unless the compiler or the sources changed; a compiler without OpenMP
builds them for one thread; a build says when it is done."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from pipeline.config.schema import load_config
from pipeline.dist.group import DistContext
from pipeline.model import LeNet, conv_pool_relu
from pipeline.speed import kernels, kernels_build
from pipeline.training.engine import Engine

from helpers import REPO, TINY_ARGS, assert_ok, require, run_pipeline

# (stage, kernel size): LeNet's input side at that stage (conv2 reads conv1's pooled output).
STAGES = [("conv1", 5), ("conv1", 3), ("conv2", 5), ("conv2", 3)]
SIDE = {("conv1", 5): 32, ("conv1", 3): 32, ("conv2", 5): 14, ("conv2", 3): 15}
BUILT = re.compile(r"built the fused conv kernels in \d+\.\d s")


@pytest.fixture(scope="module", params=list(kernels.VARIANTS))
def variant(request):
    """Each build of the kernels this CPU runs, built here or loaded from torch's extension
    cache; where no compiler is, tests using them skip (and fail in CI)."""
    name = request.param
    if not kernels.runs_here(name):
        pytest.skip(
            f"this CPU lacks {kernels.VARIANTS[name].label} (torch's capability here: "
            f"{torch.backends.cpu.get_cpu_capability()}): its build cannot run"
        )
    missing = kernels.toolchain_problem()
    if missing:
        require(f"the fused kernels cannot be built here: {missing}")
    problem = kernels.load(name)
    assert problem is None, problem  # a compiler is here: the kernels must build
    return name


@pytest.fixture(scope="module")
def built():
    """This CPU's build of the kernels, the one kernels.conv_pool_relu runs by default."""
    missing = kernels.toolchain_problem()
    if missing:
        require(f"the fused kernels cannot be built here: {missing}")
    problem = kernels.load()
    assert problem is None, problem


def stage(name: str, k: int, n: int, integer: bool = False, hw: tuple[int, int] | None = None):
    """A channels-last conv of LeNet's stage `name`, an input batch (of LeNet's size at that
    stage, or `hw`) and an output gradient."""
    cin, cout = (1, 6) if name == "conv1" else (6, 16)
    conv = nn.Conv2d(cin, cout, k).to(memory_format=torch.channels_last)
    h, w = hw or (SIDE[(name, k)],) * 2
    pooled = ((h - k + 1) // 2, (w - k + 1) // 2)
    if integer:
        # Small integers: every sum is exact, so ties (equal window values) are exact too,
        # and a kernel must pick the same winner as max_pool2d for the gradients to agree.
        with torch.no_grad():
            conv.weight.copy_(torch.randint(-2, 3, conv.weight.shape))
            conv.bias.copy_(torch.randint(-2, 3, conv.bias.shape))
        x = torch.randint(-1, 2, (n, cin, h, w)).float()
        x[:, :, : h // 4] = 1.0  # constant rows: whole windows of ties
        grad = torch.randint(-3, 4, (n, cout, *pooled)).float()
    else:
        x = torch.randn(n, cin, h, w)
        grad = torch.randn(n, cout, *pooled)
    x = x.contiguous(memory_format=torch.channels_last)
    return conv, x.requires_grad_(name == "conv2"), grad  # conv2's input needs its gradient


def both(conv: nn.Conv2d, x: torch.Tensor, grad: torch.Tensor, variant: str | None = None):
    """(output, input grad, weight grad, bias grad) from the kernel and from torch's ops."""
    out = []
    for f in (functools.partial(kernels.conv_pool_relu, variant=variant), conv_pool_relu):
        conv.zero_grad()
        x.grad = None
        y = f(conv, x)
        y.backward(grad)
        gx = None if x.grad is None else x.grad.clone()
        out.append((y.detach(), gx, conv.weight.grad.clone(), conv.bias.grad.clone()))
    return out


@pytest.mark.parametrize("name, k", STAGES)
def test_integer_data_gives_torchs_exact_values_and_gradients(variant, name, k):
    torch.manual_seed(k)
    conv, x, grad = stage(name, k, 37, integer=True)
    assert kernels._kernel(conv, x) is not None  # the kernel, not the fallback, is under test
    (y, gx, gw, gb), (y_ref, gx_ref, gw_ref, gb_ref) = both(conv, x, grad, variant)
    assert torch.equal(y, y_ref)
    assert (y == 0).float().mean() > 0.05  # ReLU's cut is exercised
    assert torch.equal(gw, gw_ref) and torch.equal(gb, gb_ref)
    if name == "conv2":
        assert torch.equal(gx, gx_ref)
        # What conv1's kernel reads, and what flatten reads without a copy.
        assert gx.is_contiguous(memory_format=torch.channels_last) and y.is_contiguous()
    else:
        assert y.is_contiguous(memory_format=torch.channels_last)  # what conv2 reads
    # In the weight's own layout: DDP's gradient buckets expect it.
    assert gw.stride() == conv.weight.stride()


@pytest.mark.parametrize(
    "name, k, hw", [("conv1", 5, (29, 31)), ("conv1", 3, (20, 17)), ("conv2", 5, (13, 11))]
)
def test_other_input_sizes_give_torchs_exact_values_and_gradients(variant, name, k, hw):
    # Odd sides (the last row and column outside any pooling window), narrow ones (fewer
    # pooled columns than a vector has lanes), non-square ones.
    torch.manual_seed(k)
    conv, x, grad = stage(name, k, 5, integer=True, hw=hw)
    assert kernels._kernel(conv, x) is not None
    for got, want in zip(*both(conv, x, grad, variant), strict=True):
        assert (got is None and want is None) or torch.equal(got, want)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name, k", STAGES)
def test_random_data_matches_torch_to_rounding(variant, name, k, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        conv, x, grad = stage(name, k, 64)
        got, ref = both(conv, x, grad, variant)
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(got, ref, strict=True):
        if b is not None:  # gradients are sums of ~10^5 terms: rounding relative to their scale
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item() + 1e-6)


@pytest.mark.parametrize("name", ["conv1", "conv2"])
def test_nan_spreads_as_in_torch(variant, name):
    torch.manual_seed(0)
    conv, x, _ = stage(name, 5, 4)
    x = x.detach().clone()
    x[1, 0, 10, 10] = float("nan")
    with torch.no_grad():
        y, y_ref = kernels.conv_pool_relu(conv, x, variant), conv_pool_relu(conv, x)
    assert y.isnan().any()
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5, equal_nan=True)


def test_where_a_kernel_does_not_apply_torchs_ops_run():
    torch.manual_seed(0)
    conv, x, _ = stage("conv1", 5, 8)
    x.requires_grad_()  # conv1's kernel computes no input gradient
    assert kernels._kernel(conv, x) is None
    kernels.conv_pool_relu(conv, x).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert kernels._kernel(nn.Conv2d(6, 16, 5, padding=1), torch.randn(2, 6, 14, 14)) is None
    assert kernels._kernel(conv.double(), torch.randn(2, 1, 32, 32).double()) is None


@pytest.mark.usefixtures("built")
@pytest.mark.parametrize("name", ["conv1", "conv2"])
def test_under_bf16_autocast_they_run_in_fp32(name):
    torch.manual_seed(0)
    conv, x, _ = stage(name, 5, 8)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = kernels.conv_pool_relu(conv, x)
        y_ref = conv_pool_relu(conv, x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)


def test_lenet_with_the_kernels_is_lenet(variant):
    torch.manual_seed(0)
    plain = LeNet().to(memory_format=torch.channels_last)
    fused = LeNet().to(memory_format=torch.channels_last)
    fused.load_state_dict(plain.state_dict())
    fused.conv_pool_relu = functools.partial(kernels.conv_pool_relu, variant=variant)
    x = torch.randn(16, 1, 32, 32)
    y = torch.randint(0, 10, (16,))
    for net in (plain, fused):
        nn.functional.cross_entropy(net(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), fused.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5, msg=name)
    assert set(fused.state_dict()) == set(plain.state_dict())  # checkpoints are unchanged


def test_each_cpu_gets_the_widest_build_it_runs(monkeypatch):
    for isa, want in (("AVX512", "avx512"), ("AVX2", "avx2"), ("DEFAULT", "portable")):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda isa=isa: isa)
        assert kernels.cpu_variant() == want, isa
        assert kernels.runs_here("portable") and kernels.runs_here(want)
        assert kernels.runs_here("avx512") is (want == "avx512")


def test_the_build_directory_follows_torchs(monkeypatch, tmp_path):
    name = kernels_build.build_name("avx2")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "ext"))
    assert kernels.build_dir("avx2") == tmp_path / "ext" / name
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    if sys.platform.startswith("linux"):  # torch's default root elsewhere ignores XDG
        assert kernels.build_dir("avx2") == tmp_path / "cache" / "torch_extensions" / name
    assert name != kernels_build.build_name("avx512")  # one build per variant


@pytest.mark.usefixtures("built")
def test_auto_picks_the_faster_path_and_remembers_it(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))  # loaded already: not rebuilt
    timings = []

    def timed(variant, batch, kernel_size, precision):
        timings.append(batch)
        return {"fused": 1.0, "torch": 1.9 if batch == 64 else 0.5}

    monkeypatch.setattr(kernels, "_time_paths", timed)
    label = kernels.VARIANTS[kernels.cpu_variant()].label
    use, why = kernels.choose("auto", 64)
    assert (
        use
        and why
        == f"fused conv kernels ({label} build: 1.9x torch's ops, measured once on this machine)"
    )
    assert kernels.choose("auto", 64) == (use, why) and timings == [64]  # remembered
    use, why = kernels.choose("auto", 512)  # another batch shape: timed again
    assert not use and why.startswith("torch's ops (2.0x the fused conv kernels'"), why
    assert timings == [64, 512]
    assert kernels.choose("true", 512)[0] and timings == [64, 512]  # forced: not timed
    assert kernels.choose("false", 64) == (False, "torch's ops (train.fused_conv=false)")
    assert not kernels.choose("auto", 64, device="cuda")[0]
    speed = json.loads((kernels.build_dir(kernels.cpu_variant()) / "speed.json").read_text())
    assert sorted(r["speedup"] for r in speed["timings"].values()) == [0.5, 1.9]


@pytest.mark.usefixtures("built")
def test_timing_the_paths_leaves_the_runs_random_stream_alone(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    use, why = kernels.choose("auto", 16)
    assert torch.equal(torch.rand(3), expected)
    assert why.startswith("fused conv kernels (" if use else "torch's ops ("), why
    speed = json.loads((kernels.build_dir(kernels.cpu_variant()) / "speed.json").read_text())
    ((key, record),) = speed["timings"].items()
    assert json.loads(key)[3:] == [16, 5, "fp32"] and record["speedup"] > 0


def test_engine_says_which_conv_path_it_runs_and_why():
    engine = Engine(LeNet(), load_config(None, ["train.fused_conv=false"]), DistContext(), 1, 1)
    assert engine.fused_conv is False
    assert engine.conv_path == "torch's ops (train.fused_conv=false)"


def test_auto_on_an_avx2_cpu_trains_on_the_faster_path(tiny_mnist, tmp_path):
    """ATEN_CPU_CAPABILITY=avx2 makes torch (and so this machine) an AVX2 one: auto times the
    AVX2 build against torch's ops, once (in the default cache, where the tests build)."""
    if kernels.toolchain_problem():
        require(f"the fused kernels cannot be built here: {kernels.toolchain_problem()}")
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    env = {"ATEN_CPU_CAPABILITY": "avx2", "OMP_NUM_THREADS": "1"}
    args = [*TINY_ARGS, f"data.root={tiny_mnist}", run_dir, "train.fused_conv=auto"]
    proc = run_pipeline(args, env=env)
    assert_ok(proc)
    speed = json.loads((kernels.build_dir("avx2") / "speed.json").read_text())
    assert speed["build"] == kernels_build.library_key("avx2")  # timings of this build only
    (ratio,) = [  # one thread, batch 32, 5x5 kernels, fp32
        r["speedup"]
        for key, r in speed["timings"].items()
        if json.loads(key)[2:] == [1, 32, 5, "fp32"]
    ]
    # The header follows the timing's line (printed once, when it measured).
    (header,) = [line for line in proc.stdout.splitlines() if line.startswith("lenet-ddp ")]
    assert ("fused conv kernels" in header) is (ratio >= 1), (header, ratio)


def test_a_machine_that_cannot_build_them_trains_with_torchs_ops(tiny_mnist, tmp_path):
    run_dir = f"train.run_dir={tmp_path / 'run'}"
    proc = run_pipeline(
        [*TINY_ARGS, f"data.root={tiny_mnist}", run_dir, "train.fused_conv=true"],
        env={"CXX": "/bin/false", "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")},
    )
    assert_ok(proc)
    warnings = [line for line in proc.stderr.splitlines() if "fused conv kernels" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning: "), proc.stderr
    assert "train.fused_conv=false" in warnings[0]
    assert "build-failed.txt" in warnings[0]  # how to make the next start try again
    assert "test acc" in proc.stdout + proc.stderr


# A fresh process's kernels.load(): {"problem", "info" (its log lines), "seconds"}; with
# --check, the kernels it loaded are compared with torch's ops (two threads).
START = """
import json, logging, sys, time
from pathlib import Path
from pipeline.speed import kernels, kernels_build
if len(sys.argv) > 1 and sys.argv[1] != "--check":
    kernels_build.CSRC = Path(sys.argv[1])
info = []
handler = logging.Handler()
handler.emit = lambda record: info.append(record.getMessage())
logging.getLogger("pipeline").addHandler(handler)
logging.getLogger("pipeline").setLevel(logging.INFO)
started = time.perf_counter()
problem = kernels.load()
seconds = time.perf_counter() - started
if problem is None and "--check" in sys.argv:
    import torch
    from pipeline.model import conv_pool_relu
    torch.manual_seed(0)
    torch.set_num_threads(2)
    conv = torch.nn.Conv2d(6, 16, 5).to(memory_format=torch.channels_last)
    x = torch.randn(64, 6, 14, 14).contiguous(memory_format=torch.channels_last)
    assert kernels._kernel(conv, x) is not None
    with torch.no_grad():
        y, y_ref = kernels.conv_pool_relu(conv, x), conv_pool_relu(conv, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
print(json.dumps({"problem": problem, "info": info, "seconds": seconds}))
"""


def start(tmp_path, cxx, *args: str, processes: int = 1):
    """kernels.load() in `processes` new processes started together, as at a run's start:
    compiler `cxx`, tmp_path/ext as torch's extension cache. One's result, or a list."""
    env = {**os.environ, "CXX": str(cxx), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START, *args],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out.splitlines()[-1]))
    return results[0] if processes == 1 else results


def script(path, body: str):
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return path


def failing_compiler(path, log):
    """A compiler that fails whatever it is asked, and writes each call as a line of `log`."""
    return script(path, f'echo "$*" >> {log}\necho "error: no compiler here" >&2\nexit 1')


def reason(problem: str) -> str:
    """load()'s reason without what it adds about trying again."""
    return re.split(r" \((not tried again|remembered)", problem)[0]


def calls(path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_a_failed_build_is_not_tried_again_at_the_next_start(tmp_path):
    log = tmp_path / "calls"
    cxx = failing_compiler(tmp_path / "cxx", log)
    first = start(tmp_path, cxx)
    assert first["problem"] and calls(log) > 0
    marker = next((tmp_path / "ext").glob(f"*/{kernels.FAILED}"))
    assert str(marker) in first["problem"] and "train.fused_conv=false" in first["problem"]
    before = calls(log)
    second = start(tmp_path, cxx)
    assert calls(log) == before  # neither the build nor the OpenMP probe ran the compiler
    assert second["seconds"] < 5, second  # the build alone takes longer (about 20 s)
    assert reason(first["problem"]) == reason(second["problem"]), (first, second)
    assert "remembered" in second["problem"] and "remembered" not in first["problem"]
    assert f"delete {marker} to retry" in second["problem"]
    assert second["info"] == []  # no "building" line: nothing is built
    marker.unlink()
    start(tmp_path, cxx)
    assert calls(log) > before  # deleting the file is how to try again


def test_a_new_compiler_or_changed_sources_are_tried(tmp_path):
    log, other_log = tmp_path / "calls", tmp_path / "other-calls"
    cxx = failing_compiler(tmp_path / "cxx", log)
    start(tmp_path, cxx)
    assert calls(log) > 0
    other = failing_compiler(tmp_path / "other-cxx", other_log)
    again = start(tmp_path, other)["problem"]
    assert calls(other_log) > 0 and "remembered" not in again  # another CXX: built again
    csrc = shutil.copytree(kernels_build.CSRC, tmp_path / "csrc")
    with open(csrc / "conv2_pool_relu.cpp", "a") as f:
        f.write("// changed\n")
    before = calls(log)
    again = start(tmp_path, cxx, str(csrc))["problem"]
    assert calls(log) > before and "remembered" not in again  # changed sources: built again


def test_ranks_starting_together_build_once(tmp_path):
    alone, together = tmp_path / "alone", tmp_path / "together"
    start(alone, failing_compiler(tmp_path / "cxx", tmp_path / "calls-alone"))
    log = tmp_path / "calls-together"
    results = start(together, failing_compiler(tmp_path / "cxx2", log), processes=3)
    assert calls(log) == calls(tmp_path / "calls-alone")  # one process built, for all three
    reasons = {reason(r["problem"]) for r in results}
    assert len(reasons) == 1 and all(r["problem"] for r in results), results
    assert sum("remembered" in r["problem"] for r in results) == 2


def test_openmp_flags_with_gcc_use_torchs_own_runtime(tmp_path):
    if kernels.toolchain_problem():
        require(f"no toolchain to probe: {kernels.toolchain_problem()}")
    if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("torch's parallel backend is not OpenMP: the kernels need no OpenMP flags")
    version = subprocess.run([kernels.compiler(), "--version"], capture_output=True, text=True)
    if "Free Software Foundation" not in version.stdout:
        pytest.skip(f"{kernels.compiler()} is not GCC")
    found = kernels.openmp(tmp_path)
    # Compiled for OpenMP (at::parallel_for's pragma), nothing linked: the OpenMP calls then
    # go to the runtime torch loaded, the one torch.set_num_threads sizes.
    assert (found.cflags, found.ldflags, found.note) == (["-fopenmp"], [], "")
    assert json.loads((tmp_path / "openmp.json").read_text())["cflags"] == ["-fopenmp"]


def test_without_openmp_they_build_for_one_thread_and_say_when_built(tmp_path):
    real = shutil.which(kernels.compiler())
    if kernels.toolchain_problem() or real is None:
        require(f"the fused kernels cannot be built here: {kernels.toolchain_problem()}")
    # A compiler without OpenMP: it refuses -fopenmp (as one without OpenMP support does).
    cxx = script(
        tmp_path / "cxx",
        'for a in "$@"; do [ "$a" = -fopenmp ] && { echo "no OpenMP" >&2; exit 1; }; done\n'
        f'exec {real} "$@"',
    )
    first = start(tmp_path, cxx, "--check")
    assert first["problem"] is None, first
    building, done = first["info"]
    label = kernels.VARIANTS[kernels.cpu_variant()].label
    assert building.startswith(f"building the fused conv kernels ({label}) into")
    if "parallel backend: OpenMP" in torch.__config__.parallel_info():
        assert "without OpenMP: they will run on one thread" in building
    assert BUILT.fullmatch(done), done
    second = start(tmp_path, cxx, "--check")  # built: loaded, silently
    assert second["problem"] is None and second["info"] == [], second


@pytest.mark.usefixtures("built")
def test_a_build_killed_mid_way_does_not_hold_up_later_starts():
    # torch's build leaves its lock file behind when killed; torch would wait on it forever.
    stale = kernels.build_dir(kernels.cpu_variant()) / "lock"
    stale.touch()
    code = "from pipeline.speed import kernels; print(kernels.load())"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.splitlines()[-1] == "None", proc.stderr[-3000:]
    assert not stale.exists()
