"""Downloading the dataset from mirrors: retries, failures, proxies, file modes, evaluation that
fetches only the test files, and the README's quick start from no data to 98.5%.

The tests serve the real MNIST files (the `mnist_root` fixture's) from an HTTP server of their
own on 127.0.0.1; nothing else is contacted. Its mirrors are paths: /ok/ serves the files,
/missing/ answers 404, /flaky/ cuts the first response for each file short, /corrupt/ serves
other content for t10k-labels (valid gzip, wrong checksum). What needs no server (the checksum
rule, the progress line, the config) is in tests/unit/test_download.py.
"""

from __future__ import annotations

import gzip
import http.server
import io
import json
import os
import shutil
import socket
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from pipeline import evaluate, train
from pipeline.data import download, store
from pipeline.data.catalog import DATASETS, FILES
from pipeline.errors import EXIT_DATA

from helpers import assert_ok, require, run_pipeline, train_here

GZ_NAMES = [name + ".gz" for name in FILES.values()]
LAST = FILES[("test", "labels")] + ".gz"  # the last file fetched
NO_PROXY = {"NO_PROXY": "127.0.0.1", "no_proxy": "127.0.0.1"}


# -- a local mirror server --------------------------------------------------------------------


class MirrorServer:
    """The real .gz files over HTTP on 127.0.0.1, with a log of (path, status) per request."""

    def __init__(self, files: dict[str, bytes]):
        self.files, self.log, self.cut = files, [], set()
        content = gzip.decompress(files[LAST])
        self.corrupt = gzip.compress(content[:-1] + bytes([(content[-1] + 1) % 10]))
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
                path = urlsplit(self.path).path  # through a proxy the line holds the full URL
                mode, _, name = path.strip("/").partition("/")
                body = server.files.get(name)
                if mode == "corrupt" and name == LAST:
                    body = server.corrupt
                if body is None or mode not in ("ok", "flaky", "corrupt"):
                    server.log.append((path, 404))
                    self.send_error(404)
                    return
                cut = mode == "flaky" and name not in server.cut
                server.log.append((path, 206 if cut else 200))  # 206: "cut short", in the log
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if cut:
                    server.cut.add(name)
                    body = body[: len(body) // 2]
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, mode: str) -> str:
        return f"http://127.0.0.1:{self.port}/{mode}/"

    def served(self, mode: str) -> list[str]:
        """The files served whole through `mode`, in order."""
        return [p.rsplit("/", 1)[1] for p, s in self.log if s == 200 and p.startswith(f"/{mode}/")]


@pytest.fixture(scope="module")
def real_gz(mnist_root: Path) -> dict[str, bytes]:
    raw = mnist_root / "MNIST" / "raw"
    if not all((raw / name).is_file() for name in GZ_NAMES):
        require(f"real MNIST .gz files not found in {raw}; set MNIST_ROOT to a directory above it")
    return {name: (raw / name).read_bytes() for name in GZ_NAMES}


@pytest.fixture
def server(real_gz: dict[str, bytes]) -> Iterator[MirrorServer]:
    s = MirrorServer(real_gz)
    s.thread.start()
    yield s
    s.httpd.shutdown()
    s.httpd.server_close()


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port on 127.0.0.1 that refuses connections: bound, never listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for key, value in NO_PROXY.items():
        monkeypatch.setenv(key, value)


def everything_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def prepare_args(root: Path, run_dir: Path, mirrors: str, *extra: str) -> list[str]:
    """A short run (one step, torch's ops) that downloads into `root` from `mirrors`."""
    return [
        "--config",
        "configs/cpu.yaml",
        f"data.root={root}",
        f"data.mirrors={mirrors}",
        f"train.run_dir={run_dir}",
        "train.max_steps=1",
        "train.fused_conv=false",
        "tracking.mode=disabled",
        *extra,
    ]


def error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr, stderr
    return lines[0]


# -- downloads in real processes --------------------------------------------------------------


def test_404_on_the_first_mirror_then_the_second_serves_two_ranks(
    server: MirrorServer, tmp_path: Path
) -> None:
    root, run_dir = tmp_path / "data", tmp_path / "run"
    mirrors = f"{server.url('missing')},{server.url('ok')}"
    proc = run_pipeline(prepare_args(root, run_dir, mirrors), nproc=2, env=NO_PROXY, timeout=300)
    assert_ok(proc)
    # One process per node downloads: every file once, the first one after a 404.
    assert server.served("ok") == GZ_NAMES
    assert server.log[0] == (f"/missing/{GZ_NAMES[0]}", 404)
    assert [s for _, s in server.log].count(404) == 1  # the mirror that served goes first
    size = len(server.files[GZ_NAMES[0]]) / 1e6
    assert f"downloading {server.url('ok')}{GZ_NAMES[0]} ({size:.1f} MB)\n" in proc.stderr
    assert everything_under(store.raw_dir(root)) == sorted(GZ_NAMES)  # no staging left
    assert "| data mnist |" in proc.stdout
    record = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert record["dataset"] == "mnist"
    assert json.loads((run_dir / "summary.json").read_text())["dataset"] == "mnist"


def test_evaluate_fetches_the_test_files_from_the_runs_mirror(
    server: MirrorServer, tmp_path: Path, no_proxy, capsys
) -> None:
    """A run trained from a custom mirror, its test files gone: evaluate downloads those two
    from the run's data.mirrors, and none of the training files it does not need. (In this
    process: the commands called as functions.)"""
    root, run_dir = tmp_path / "data", tmp_path / "run"
    assert train.main(prepare_args(root, run_dir, server.url("ok"))) == 0
    shutil.rmtree(root / "MNIST" / "cache")
    tests = [name for name in GZ_NAMES if name.startswith("t10k")]
    for name in [*tests, *(n for n in GZ_NAMES if n.startswith("train"))]:
        (store.raw_dir(root) / name).unlink()
    server.log.clear()
    capsys.readouterr()
    assert evaluate.main([str(run_dir), "--tracking", "disabled"]) == 0
    assert server.served("ok") == tests
    assert "test images:     10,000" in capsys.readouterr().out


# The failures and the retry, in this process: the training command called as a function.


def test_truncated_response_is_retried(server: MirrorServer, tmp_path: Path, no_proxy, capsys):
    root = tmp_path / "data"
    assert train.main(prepare_args(root, tmp_path / "run", server.url("flaky"))) == 0
    # Each file: one response cut short, then one whole.
    assert [s for _, s in server.log] == [206, 200] * len(GZ_NAMES)
    err = capsys.readouterr().err
    assert f"{server.url('flaky')}{GZ_NAMES[0]} failed: the response broke off" in err
    assert everything_under(store.raw_dir(root)) == sorted(GZ_NAMES)


def test_corrupt_file_ends_in_one_line_and_leaves_nothing(
    server: MirrorServer, tmp_path: Path, no_proxy, capsys
) -> None:
    root = tmp_path / "data"
    root.mkdir()
    url = server.url("corrupt")
    assert train.main(prepare_args(root, tmp_path / "run", url)) == EXIT_DATA
    line = error_line(capsys.readouterr().err)
    assert f"could not download {LAST}: tried {url}{LAST}: MD5 " in line
    assert "of its content the canonical 27ae3e4e09519cfbb04c329615203637" in line
    assert "(3 tries)" in line and "data.mirrors" in line
    assert str(store.raw_dir(root).absolute()) in line
    # Three files were good, but a failure leaves nothing: no partial file, no staging.
    assert server.served("corrupt") == [*GZ_NAMES, LAST, LAST]
    assert everything_under(root) == []


def test_connection_refused_and_404_end_in_one_line_naming_both(
    server: MirrorServer, refused_port: int, tmp_path: Path, no_proxy, capsys
) -> None:
    root = tmp_path / "data"
    refused, missing = f"http://127.0.0.1:{refused_port}/", server.url("missing")
    assert train.main(prepare_args(root, tmp_path / "run", f"{refused},{missing}")) == EXIT_DATA
    line = error_line(capsys.readouterr().err)
    first = GZ_NAMES[0]
    assert (
        f"could not download {first}: tried {refused}{first}: connection refused (3 tries); "
        f"{missing}{first}: HTTP 404 Not Found; copy {', '.join(GZ_NAMES)} (.gz or uncompressed) "
        f"into {store.raw_dir(root).absolute()} by hand, or set data.mirrors" in line
    )
    assert not root.exists()


# -- in this process: proxies, modes ----------------------------------------------------------


def test_proxy_from_the_environment_is_used(
    server: MirrorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The host does not exist: only the proxy (our server) can answer for it.
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{server.port}")
    remotes = [DATASETS["mnist"].remote(FILES[("test", "labels")])]
    download.fetch_all(
        tmp_path, remotes, ["http://mirror.invalid/ok/"], "do something", io.StringIO()
    )
    assert server.served("ok") == [LAST]
    assert (tmp_path / LAST).read_bytes() == server.files[LAST]


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_downloaded_files_follow_the_umask(
    server: MirrorServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, umask: int
) -> None:
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    remotes = [DATASETS["mnist"].remote(FILES[("test", "labels")])]
    old = os.umask(umask)
    try:
        download.fetch_all(tmp_path, remotes, [server.url("ok")], "do something", io.StringIO())
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / LAST).stat().st_mode) == 0o666 & ~umask


# -- the README's quick start, from no data ----------------------------------------------------


def test_default_config_from_no_data_reaches_98_5_percent(
    server: MirrorServer, tmp_path: Path, no_proxy
) -> None:
    root, run_dir = tmp_path / "empty", tmp_path / "run"
    root.mkdir()
    args = [
        "--config",
        "configs/cpu.yaml",
        f"data.root={root}",
        f"data.mirrors={server.url('ok')}",
        f"train.run_dir={run_dir}",
        "tracking.mode=disabled",
    ]
    # In this process, on one thread (tests/conftest.py): two would crawl on a busy machine.
    assert_ok(train_here(args))
    assert server.served("ok") == GZ_NAMES
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 3 and summary["epochs"] == 3
    assert summary["test_of"] == f"best.pt (epoch {summary['selected_epoch']})"
    assert summary["test_accuracy"] >= 0.985
