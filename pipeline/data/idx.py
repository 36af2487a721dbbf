"""The IDX files of MNIST-format datasets, read with every check.

`read_bytes` finds a file in either form (`.gz` or uncompressed); `parse` checks its magic
number, its 28x28 images, that its length is what the header implies, its count and MD5 where
expected, and returns a uint8 array; every problem is a `DataError` of one line that names the
file.
"""

from __future__ import annotations

import gzip
import hashlib
import math
import zlib
from pathlib import Path

import numpy as np

from pipeline.errors import DataError, describe

MAGIC: dict[str, int] = {"images": 2051, "labels": 2049}  # IDX: ubyte data, 3 dims / 1 dim
REDOWNLOAD = "delete it to have it downloaded again (data.download=true), or copy a good one there"


def other_form(path: Path) -> Path:
    name = path.name
    return path.with_name(name[:-3] if name.endswith(".gz") else name + ".gz")


def locate(path: Path) -> Path | None:
    """`path` if it exists, else its .gz / uncompressed twin, else None."""
    for candidate in (path, other_form(path)):
        if candidate.is_file():
            return candidate
    return None


def read_bytes(path: Path) -> tuple[Path, bytes]:
    """The decompressed content of `path` (or its twin) and the file it came from."""
    found = locate(path)
    if found is None:
        raise DataError(
            f"MNIST file {path} not found (nor {other_form(path).name}); copy it there "
            "(a run with data.download=true downloads the files that are missing)"
        )
    try:
        if found.name.endswith(".gz"):
            with gzip.open(found, "rb") as f:
                return found, f.read()
        return found, found.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # BadGzipFile first: it is an OSError
        raise DataError(
            f"MNIST file {found} is a damaged gzip file ({describe(e, with_type=True)}); "
            f"{REDOWNLOAD}"
        ) from e
    except OSError as e:
        raise DataError(
            f"MNIST file {found} cannot be read ({describe(e, with_type=True)}); "
            "check its permissions"
        ) from e


def parse(
    path: Path,
    data: bytes,
    *,
    expected_magic: int,
    expected_count: int | None,
    expected_md5: str | None,
) -> np.ndarray:
    """Check the IDX structure of `data` (the content of `path`) and return its array."""
    kind = {v: k for k, v in MAGIC.items()}.get(expected_magic)
    if kind is None:
        raise ValueError(
            f"expected_magic must be one of {sorted(MAGIC.values())}, not {expected_magic}"
        )

    def fail(problem: str) -> DataError:
        return DataError(f"MNIST file {path} {problem}; {REDOWNLOAD}")

    if len(data) < 8:
        raise fail(f"is truncated: {len(data)} bytes cannot hold an IDX header")
    magic = int.from_bytes(data[:4], "big")
    if magic != expected_magic:
        raise fail(f"has magic number {magic}, but MNIST {kind} files start with {expected_magic}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise fail(f"is truncated: {len(data)} bytes cannot hold an IDX header of {header} bytes")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if kind == "images" and dims[1:] != (28, 28):
        raise fail(f"holds images of {dims[1]}x{dims[2]}, but MNIST images are 28x28")
    need = header + math.prod(dims)
    what = f"{dims[0]} {kind}" + (" of 28x28" if kind == "images" else "")
    held = f"{len(data)} bytes" + (" once decompressed" if path.name.endswith(".gz") else "")
    if len(data) < need:
        raise fail(f"is truncated: header says {what} ({need} bytes) but it holds {held}")
    if len(data) > need:
        raise fail(f"has extra data: header says {what} ({need} bytes) but it holds {held}")
    if expected_count is not None and dims[0] != expected_count:
        raise fail(f"holds {dims[0]} {kind} but {expected_count} were expected")
    if expected_md5 is not None and (md5 := hashlib.md5(data).hexdigest()) != expected_md5:
        raise fail(f"has MD5 {md5} (decompressed) but the canonical file has {expected_md5}")
    array = np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()
    if kind == "labels" and array.size and (top := int(array.max())) > 9:
        raise fail(f"holds label {top}, but MNIST labels are 0-9")
    return array
