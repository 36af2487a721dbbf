"""What the tests share (the fixtures are in conftest.py): where the repository and the real MNIST
are, the skip-or-fail rule for a missing prerequisite, tiny IDX datasets, starting the real
commands in fresh processes (alone, under torchrun, in the background) or calling them in this
one, finding and ending the processes a test started (`OWNER`, `end_processes`: conftest.py's
cleanup), and the small tools tests of several tiers use (SLURM step variables, an environment
without W&B credentials, a spy on the data cache).

Imported by name (`from helpers import ...`): pyproject.toml puts tests/ on pytest's pythonpath.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.config.schema import Config, to_dict
from pipeline.data import store
from pipeline.data.catalog import FILES
from pipeline.data.idx import MAGIC
from pipeline.model import LeNet
from pipeline.training import checkpoint

REPO = Path(__file__).resolve().parents[1]
TESTS = REPO / "tests"


def require(reason: str) -> None:
    """A prerequisite is missing: skip with `reason` for a user; fail with it in CI (CI=true),
    where every prerequisite must be present and no test may pass by skipping."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: this test must run, not skip)", pytrace=False)
    pytest.skip(reason)


def _holds_mnist(root: Path) -> bool:
    return (root / "MNIST" / "raw").is_dir()


def find_real_mnist(environ: Mapping[str, str] | None = None, repo: Path = REPO) -> Path | None:
    """Where the real MNIST is (the directory holding MNIST/raw), or None: $MNIST_ROOT where it
    is set (and only there); else the checkout's data/, where the quick start's first run
    downloads it; else ../shared/data beside the checkout. Absolute: batch jobs and launched
    processes run from other directories."""
    environ = os.environ if environ is None else environ
    if environ.get("MNIST_ROOT"):
        root = Path(environ["MNIST_ROOT"]).resolve()
        return root if _holds_mnist(root) else None
    for root in (repo / "data", repo.parent / "shared" / "data"):
        if _holds_mnist(root):
            return root.resolve()
    return None


def real_mnist_missing(environ: Mapping[str, str] | None = None, repo: Path = REPO) -> str:
    """Why `find_real_mnist` found nothing, naming every place it looks."""
    environ = os.environ if environ is None else environ
    data, shared = (
        repo / "data" / "MNIST" / "raw",
        repo.parent / "shared" / "data" / "MNIST" / "raw",
    )
    if environ.get("MNIST_ROOT"):
        root = Path(environ["MNIST_ROOT"]).resolve()
        return (
            f"real MNIST not found at {root}/MNIST/raw (MNIST_ROOT); without MNIST_ROOT the "
            f"tests look in {data}, then {shared}"
        )
    return (
        f"real MNIST not found: MNIST_ROOT is not set, and neither {data} (where a first "
        f"`python -m pipeline.train --config configs/cpu.yaml` downloads it) nor {shared} "
        "exists; set MNIST_ROOT to a directory holding MNIST/raw"
    )


def require_real_mnist() -> Path:
    """The real MNIST's root; where it is not found, `require` it (skip, or fail in CI)."""
    root = find_real_mnist()
    if root is None:
        require(real_mnist_missing())
    return root


def write_tiny_mnist(
    root: Path, n_train: int = 512, n_test: int = 128, seed: int = 0, folder: str = "MNIST"
) -> Path:
    """A small random dataset in MNIST's IDX layout under `root`/`folder`/raw (FashionMNIST,
    KMNIST: the folders of the other data.dataset values)."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        # Learnable: each class lights up its own band of rows, plus noise.
        images = rng.integers(0, 60, (n, 28, 28), dtype=np.uint8)
        for i, label in enumerate(labels):
            images[i, 2 * label + 4 : 2 * label + 7, 4:24] = 250
        write_idx(raw / FILES[(split, "images")], images)
        write_idx(raw / FILES[(split, "labels")], labels)
    return root


def child_env(extra: dict | None = None) -> dict:
    """The environment of a process a test starts: this one's, unbuffered output, one thread
    per process, W&B off unless `extra` or the caller's environment says otherwise."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", **(extra or {})}
    env.setdefault("WANDB_MODE", "disabled")
    return env


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_entry(args: list[str], faults: list[str] | None = None) -> list[str]:
    """What runs the training command: `-m pipeline.train ARGS`, or with `faults` (options of
    tests/faulty_train.py, e.g. ["--fail-rank", "1", "--fail-step", "13"]) that script."""
    if faults is None:
        return ["-m", "pipeline.train", *args]
    return [str(TESTS / "faulty_train.py"), *faults, "--", *args]


def launch_cmd(nproc: int, args: list[str], faults: list[str] | None = None) -> list[str]:
    """`python -m pipeline.train ARGS`, under torchrun (standalone, free port) when nproc > 1."""
    if nproc == 1:
        return [sys.executable, *train_entry(args, faults)]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        *train_entry(args, faults),
    ]


def run_pipeline(
    args: list[str],
    nproc: int = 1,
    env: dict | None = None,
    timeout: float = 600,
    extra_launcher_args: list[str] = (),
    faults: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real entry point in fresh processes (with `faults`, see `train_entry`); returns
    the finished process (text output)."""
    cmd = launch_cmd(nproc, args, faults)
    if extra_launcher_args:
        cmd = cmd[:3] + list(extra_launcher_args) + cmd[3:]
    return subprocess.run(
        cmd, cwd=REPO, env=child_env(env), capture_output=True, text=True, timeout=timeout
    )


def call_command(main: Callable[[list[str]], int], args: list[str]) -> tuple[int, str, str]:
    """A command's `main(args)` called in this process: its exit code, stdout and stderr. For a
    fixture shared by several tests, where pytest's capsys is not available."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


def train_here(args: list[str]) -> subprocess.CompletedProcess:
    """`python -m pipeline.train ARGS` called in this process, as one rank: for a run whose
    being a process of its own does not matter (a reference to compare with, say); what
    `run_pipeline(args)` gives, without its 3 s of imports."""
    from pipeline import train

    code, out, err = call_command(train.main, args)
    return subprocess.CompletedProcess(["pipeline.train", *args], code, out, err)


def run_ranks(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    """The training command on `nproc` ranks: one in this process (`train_here`), more under
    torchrun (`run_pipeline`)."""
    return train_here(args) if nproc == 1 else run_pipeline(args, nproc=nproc)


TINY_ARGS = [
    "train.epochs=1",
    "train.batch_size=32",
    "train.eval_batch_size=64",
    "train.log_every=4",
    "tracking.mode=disabled",
    "data.download=false",
    # torch's conv ops: what these runs test does not depend on the conv path, and `auto` would
    # time the fused kernels at each new batch shape first (the kernels' own tests, and runs
    # on them: tests/integration).
    "train.fused_conv=false",
]


def final_model(run_dir: Path) -> dict:
    """The model state of the newest checkpoint in `run_dir`."""
    from pipeline.training import checkpoint

    found = checkpoint.list_checkpoints(Path(run_dir))
    assert found, f"no checkpoint in {run_dir}"
    return checkpoint.load(found[0])["model"]


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    output = f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}\n{output}"


def tiny_run(root, run_dir, nproc=1, batch=1024, extra=(), env=None) -> dict:
    """8 steps (2 epochs of 4) at global batch `batch` on `root`'s 4096 images; the final model
    in float32."""
    args = [
        *TINY_ARGS,
        f"data.root={root}",
        f"train.run_dir={run_dir}",
        "train.epochs=2",
        f"train.batch_size={batch}",
        "optim.lr=0.1",
        *extra,
    ]
    assert_ok(run_ranks(args, nproc) if env is None else run_pipeline(args, nproc, env=env))
    return {k: v.float() for k, v in final_model(run_dir).items()}


def read_jsonl(path: Path) -> list[dict]:
    """The records of a JSON-lines file (metrics.jsonl, steps.jsonl), in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def max_diff(a: dict, b: dict) -> float:
    """The largest elementwise difference between two state dicts."""
    return max((a[k] - b[k]).abs().max().item() for k in a)


@contextlib.contextmanager
def background_training(
    args: list[str], log: Path, env: dict | None = None, faults: list[str] | None = None, **popen
):
    """`python -m pipeline.train ARGS` running in the background, its output (stdout and
    stderr) in the file `log`; killed on leaving the block if it is still running."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            launch_cmd(1, args, faults),
            cwd=REPO,
            env=child_env(env),
            stdout=out,
            stderr=out,
            **popen,
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, log: Path, timeout: float = 180):
    """Wait until the run in `run_dir` has logged a step; fail with its output if it ends or
    takes longer than `timeout` seconds."""
    steps, deadline = run_dir / "steps.jsonl", time.monotonic() + timeout
    while not (steps.exists() and steps.stat().st_size):
        assert proc.poll() is None, f"training ended early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step after {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(0.05)


# Which pytest session (and which test in it) started a process: conftest.py sets it in this
# process's environment, and every process a test starts inherits it, whatever its session or
# parent (a torchrun rank, a Slurm daemon or job, a tmux server).
OWNER = "LENET_TEST_OWNER"


def processes_with(var: str, match: Callable[[str], bool]) -> list[int]:
    """The processes (not this one) whose environment, as they were started, has `var` with a
    value `match` accepts; none where there is no /proc. Processes that end while being read,
    other users' processes and zombies (their environment reads empty) are left out."""
    if not os.path.isdir("/proc"):
        return []
    key, found = f"{var}=".encode(), []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                environ = f.read().split(b"\0")
        except OSError:
            continue
        values = [v[len(key) :].decode(errors="replace") for v in environ if v.startswith(key)]
        if values and match(values[0]):
            found.append(int(name))
    return found


def end_processes(var: str, match: Callable[[str], bool], grace: float = 3.0) -> None:
    """End the processes `processes_with(var, match)` finds: SIGTERM, then SIGKILL to those
    still there after `grace` seconds, or at once on a second Ctrl-C."""

    def send(sig: int) -> list[int]:
        pids = processes_with(var, match)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        return pids

    deadline = time.monotonic() + grace
    try:
        if send(signal.SIGTERM):
            while processes_with(var, match) and time.monotonic() < deadline:
                time.sleep(0.05)
    finally:
        send(signal.SIGKILL)


def run_bench(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`python -m pipeline.bench ARGS` from the repository root (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.bench", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def count_decodes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Spy on the slow path (reading and checking the raw files); returns a call log."""
    calls: list[int] = []
    real = store._decode

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "_decode", spy)
    return calls


def identity(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


def step_env(procid: int, nodes: int = 2, per_node: int = 2, **extra: str) -> dict:
    """The variables srun sets for task `procid` of a step with `per_node` tasks on each node."""
    node = procid // per_node
    return {
        "SLURM_JOB_ID": "123456",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(node),
        "SLURM_STEP_NUM_TASKS": str(nodes * per_node),
        "SLURM_STEP_NUM_NODES": str(nodes),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})" if nodes > 1 else str(per_node),
        "SLURM_STEP_NODELIST": "localhost" if nodes == 1 else f"localhost,node[2-{nodes}]",
        **extra,
    }


def no_credentials(tmp_path) -> dict[str, str]:
    """An environment in which W&B has no login: no key, no .netrc entry, no WANDB_MODE."""
    return {
        "WANDB_MODE": "",
        "WANDB_API_KEY": "",
        "WANDB_IDENTITY_TOKEN_FILE": "",
        "NETRC": str(tmp_path / "no-netrc"),
    }


def run_dir_with_two_checkpoints(run_dir: Path) -> Path:
    """A run directory with two checkpoints of an untrained LeNet (no data needed)."""
    run_dir.mkdir(parents=True)
    for step in (1, 2):
        torch.manual_seed(step)
        state = {"model": LeNet().state_dict(), "config": to_dict(Config()), "global_step": step}
        checkpoint.save(run_dir, step, state, keep=3)
    return run_dir


def same_state(a, b) -> bool:
    """Whether two checkpoint states are equal to the bit: the same keys in the same order, the
    same types, tensors of the same dtype and values."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same_state, a, b))
    return type(a) is type(b) and a == b


def write_idx(path: Path, array: np.ndarray, *, gz: bool = False) -> None:
    """Write uint8 images [N, 28, 28] or labels [N] as an IDX file, atomically.

    With `gz=True` the content is gzip-compressed and `.gz` is appended to the name unless it
    already ends so.
    """
    if array.dtype != np.uint8 or not (array.ndim == 1 or array.shape[1:] == (28, 28)):
        raise ValueError(
            "write_idx needs uint8 labels [N] or images [N, 28, 28], "
            f"got {array.dtype} {list(array.shape)}"
        )
    magic = MAGIC["labels"] if array.ndim == 1 else MAGIC["images"]
    data = b"".join(int(v).to_bytes(4, "big") for v in (magic, *array.shape))
    data += np.ascontiguousarray(array).tobytes()
    path = Path(path)
    if gz:
        path = path if path.name.endswith(".gz") else path.with_name(path.name + ".gz")
        data = gzip.compress(data, mtime=0)  # mtime=0: same array, same bytes
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
