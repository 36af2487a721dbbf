"""Download files from an ordered list of mirrors: streamed, retried, checked, then moved in.

`fetch_all` takes the files a directory lacks and, for each, tries every mirror in order, each
a few times with a growing pause. pooch's HTTP downloader streams the response (through the
proxies that the environment names, as requests does) into a temporary file in a private
staging directory beside the target, with a progress line on stderr. A file is accepted when
`check` says it is the canonical one; only when every file has been accepted are they renamed
into place. A failure is a `DataError` of one line naming each URL tried and why, and the
staging directory (and any directory created for it) is removed: nothing partial is left.

The retry and mirror loop is ours rather than pooch's `retrieve`: pooch checks one hash, while
a mirror's re-compressed `.gz` is accepted on the checksum of its decompressed bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import shutil
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from pipeline.errors import DataError, describe

ATTEMPTS = 3  # per mirror and file
FIRST_PAUSE_S = 1.0  # before the second attempt; doubled before each one after it
TIMEOUT_S = (10.0, 60.0)  # connecting, and waiting for the next bytes
CHUNK = 1 << 16
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Remote:
    """A file as mirrors serve it: `name` (a .gz), its MD5, and that of its decompressed bytes
    where one is known (mirrors re-compress, which changes the first but not the second)."""

    name: str
    gz_md5: str
    raw_md5: str | None = None


def _md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def check(data: bytes, remote: Remote) -> str | None:
    """None when `data` is the canonical file `remote`, else why it is not (a phrase)."""
    got = _md5(data)
    if got == remote.gz_md5:
        return None
    why = f"MD5 {got} is not the canonical {remote.gz_md5}"
    if remote.raw_md5 is None:
        return why + " (no checksum of its decompressed content is known)"
    try:
        # A server that sets Content-Encoding: gzip has it decompressed on the way.
        content = gzip.decompress(data) if data[:2] == GZIP_MAGIC else data
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        return f"{why}, and it does not decompress ({describe(e, with_type=True)})"
    if (raw := _md5(content)) == remote.raw_md5:
        return None
    return f"{why}, nor is MD5 {raw} of its content the canonical {remote.raw_md5}"


def stored_name(data: bytes, remote: Remote) -> str:
    """The name an accepted file is kept under: without `.gz` when it came decompressed."""
    return remote.name if data[:2] == GZIP_MAGIC else remote.name.removesuffix(".gz")


def mirror_url(mirror: str, name: str) -> str:
    return mirror.rstrip("/") + "/" + name


class Progress:
    """pooch's progress-bar protocol (total, update, reset, close) as one line on `stream`:
    redrawn in place on a terminal, printed once when the download starts elsewhere."""

    def __init__(self, url: str, stream: TextIO):
        self.url, self.stream = url, stream
        self.tty = stream.isatty()
        self.total, self.done, self.shown = 0, 0, -1

    def _size(self, n: int) -> str:
        return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"

    def update(self, n: int) -> None:
        first = self.shown < 0
        self.done = min(self.done + n, self.total) if self.total else self.done + n
        if not self.tty:
            if first:
                size = f" ({self._size(self.total)})" if self.total else ""
                self._write(f"downloading {self.url}{size}\n")
                self.shown = 0
            return
        percent = 100 * self.done // self.total if self.total else self.done >> 20
        if percent != self.shown:
            self.shown = percent
            of = f" of {self._size(self.total)}" if self.total else ""
            self._write(f"\rdownloading {self.url}: {self._size(self.done)}{of}")

    def reset(self) -> None:
        self.done = 0

    def close(self) -> None:
        """End the line on a terminal; called again when the download failed midway."""
        if self.tty and self.shown >= 0:
            self._write("\n")
        self.shown = -1

    def _write(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()


def _why(e: Exception) -> str:
    """A short reason for a failed request: 'HTTP 404 Not Found', 'connection refused'..."""
    import requests  # pooch's dependency; imported late like pooch itself

    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code} {e.response.reason}".rstrip()
    if isinstance(e, requests.Timeout):
        return f"no answer within {TIMEOUT_S[0]:g} s (connect) / {TIMEOUT_S[1]:g} s (read)"
    if isinstance(e, requests.exceptions.ChunkedEncodingError):
        found = re.search(r"IncompleteRead\(\d+ bytes read, \d+ more expected\)", str(e))
        return "the response broke off" + (f" ({found.group()})" if found else "")
    if isinstance(e, requests.ConnectionError):
        found = re.search(r"\[Errno -?\d+\] ([^'\")]+)", str(e))
        return found.group(1).strip().lower() if found else describe(e, with_type=True)
    return describe(e, with_type=True)


def _download_once(url: str, path: Path, stream: TextIO) -> None:
    """One GET of `url` into `path` (created with the umask's mode), flushed to disk."""
    import pooch  # late: importing it pulls in requests

    progress = Progress(url, stream)
    downloader = pooch.HTTPDownloader(progressbar=progress, chunk_size=CHUNK, timeout=TIMEOUT_S)
    try:
        with open(path, "xb") as f:
            downloader(url, f, None)
            f.flush()
            os.fsync(f.fileno())
    finally:
        progress.close()


def _fetch_one(
    remote: Remote, mirrors: list[str], staging: Path, stream: TextIO
) -> tuple[Path, int] | list[str]:
    """The accepted file in `staging` and the index of the mirror that served it, or why each
    URL failed."""
    import requests

    failures: list[str] = []
    for index, mirror in enumerate(mirrors):
        url = mirror_url(mirror, remote.name)
        pause = FIRST_PAUSE_S
        for attempt in range(1, ATTEMPTS + 1):
            path = staging / f"{remote.name}.part"
            path.unlink(missing_ok=True)
            try:
                _download_once(url, path, stream)
                data = path.read_bytes()
                why = check(data, remote)
            except requests.RequestException as e:  # before OSError: it is one
                why = _why(e)
                status = e.response.status_code if e.response is not None else None
                if status is not None and 400 <= status < 500 and status not in (408, 429):
                    failures.append(f"{url}: {why}")  # not there: no use asking again
                    break
            except OSError as e:  # our side: a full disk, a file we cannot write
                raise DataError(
                    f"cannot write {path} ({describe(e, with_type=True)}); free space there "
                    "or point data.root at another directory"
                ) from e
            if why is None:
                kept = staging / stored_name(data, remote)
                os.replace(path, kept)
                return kept, index
            if attempt == ATTEMPTS:
                failures.append(f"{url}: {why} ({ATTEMPTS} tries)")
                break
            stream.write(f"download of {url} failed: {why}; trying again in {pause:g} s\n")
            stream.flush()
            time.sleep(pause)
            pause *= 2
    (staging / f"{remote.name}.part").unlink(missing_ok=True)
    return failures


def _created_dirs(directory: Path) -> list[Path]:
    """The directories that creating `directory` makes, innermost first."""
    made = []
    while not directory.exists() and directory != directory.parent:
        made.append(directory)
        directory = directory.parent
    return made


def fetch_all(
    directory: Path,
    remotes: list[Remote],
    mirrors: list[str],
    what_to_do: str,
    stream: TextIO | None = None,
) -> None:
    """Download every file of `remotes` into `directory`, or none of them, saying so on
    `stream` (the standard error stream of the moment when None).

    Raises DataError naming each URL tried and why, followed by `what_to_do`.
    """
    stream = stream or sys.stderr
    if not mirrors:
        raise DataError(f"no mirrors to download from; {what_to_do}")
    made = _created_dirs(directory)
    staging: Path | None = None
    done = False
    try:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(dir=directory, prefix=".download-"))
        except OSError as e:
            raise DataError(
                f"cannot write the downloads into {directory} ({describe(e, with_type=True)}); "
                f"{what_to_do}"
            ) from e
        order = list(mirrors)
        fetched: list[Path] = []
        for remote in remotes:
            result = _fetch_one(remote, order, staging, stream)
            if isinstance(result, list):
                raise DataError(
                    f"could not download {remote.name}: tried {'; '.join(result)}; {what_to_do}"
                )
            path, index = result
            fetched.append(path)
            order.insert(0, order.pop(index))  # the mirror that served it goes first
        for path in fetched:
            os.replace(path, directory / path.name)
        done = True
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not done:
            for path in made:  # only if still empty: another node may share the same root
                _rmdir_quietly(path)


def _rmdir_quietly(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass
