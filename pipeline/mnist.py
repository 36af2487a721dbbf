"""MNIST-format IDX files -> verified uint8 tensors, cached in one file so every rank loads fast.

Three datasets share the format and the file names: MNIST, Fashion-MNIST and Kuzushiji-MNIST
(`DATASETS`). One process per node calls `prepare(root, download=..., dataset=...)`: it finds
the four IDX files under `<root>/<Folder>/raw` (torchvision's layout, `.gz` or uncompressed),
downloads those missing from the dataset's mirrors (`pipeline.fetch`), checks their structure
and MD5 sums, and writes `<root>/<Folder>/cache/<dataset>-v1.pt`. Every process then calls
`load(root, dataset)`, which maps that cache into memory. Errors are `DataError`s with one line
that names the file and says what to do; nothing here prints (downloads report on stderr).
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import secrets
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from pipeline import fetch
from pipeline.datasets import FILES, spec
from pipeline.errors import DataError, describe

CANONICAL_COUNT: dict[str, int] = {"train": 60000, "test": 10000}
MAGIC: dict[str, int] = {"images": 2051, "labels": 2049}  # IDX: ubyte data, 3 dims / 1 dim
CACHE_VERSION = 1  # bump when the cache layout changes; older caches are then rebuilt
_KEYS = ("train_images", "train_labels", "test_images", "test_labels")
_REDOWNLOAD = "delete it to have it downloaded again (data.download=true), or copy a good one there"


def raw_dir(root: str | os.PathLike[str], dataset: str = "mnist") -> Path:
    """Where the IDX files live: `<root>/<Folder>/raw` (MNIST, FashionMNIST, KMNIST), as
    torchvision lays them out."""
    return Path(root) / spec(dataset).folder / "raw"


def _other_form(path: Path) -> Path:
    name = path.name
    return path.with_name(name[:-3] if name.endswith(".gz") else name + ".gz")


def _locate(path: Path) -> Path | None:
    """`path` if it exists, else its .gz / uncompressed twin, else None."""
    for candidate in (path, _other_form(path)):
        if candidate.is_file():
            return candidate
    return None


def _read_bytes(path: Path) -> tuple[Path, bytes]:
    """The decompressed content of `path` (or its twin) and the file it came from."""
    found = _locate(path)
    if found is None:
        raise DataError(
            f"MNIST file {path} not found (nor {_other_form(path).name}); copy it there "
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
            f"{_REDOWNLOAD}"
        ) from e
    except OSError as e:
        raise DataError(
            f"MNIST file {found} cannot be read ({describe(e, with_type=True)}); "
            "check its permissions"
        ) from e


def _parse(
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
        return DataError(f"MNIST file {path} {problem}; {_REDOWNLOAD}")

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


def read_idx(
    path: Path,
    *,
    expected_magic: int,
    expected_count: int | None = None,
    expected_md5: str | None = None,
) -> np.ndarray:
    """Read an MNIST IDX file (`.gz` or not; the other form is tried when `path` is absent).

    Checks the magic number (2051 images, 2049 labels), 28x28 images, that the byte length is
    exactly what the header implies, the item count and the MD5 of the decompressed bytes
    (each when expected). Returns uint8 [N, 28, 28] images or uint8 [N] labels.
    """
    found, data = _read_bytes(Path(path))
    return _parse(
        found,
        data,
        expected_magic=expected_magic,
        expected_count=expected_count,
        expected_md5=expected_md5,
    )


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
    _atomic_write(path, lambda f: f.write(data))


def _atomic_write(path: Path, write: Callable[[IO[bytes]], Any]) -> None:
    """Readers see the old file or the complete new one, never a partial one. The file gets
    the mode the umask gives new files (tempfile's would be 0600 whatever the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _raw_files(root: Path, dataset: str) -> tuple[dict[tuple[str, str], Path], list[str]]:
    """The four raw files found under `root`, and the names of those missing."""
    # Uncompressed first: that is what torchvision reads, and it needs no decompression.
    located = {key: _locate(raw_dir(root, dataset) / name) for key, name in FILES.items()}
    found = {key: p for key, p in located.items() if p is not None}
    return found, [FILES[key] for key, p in located.items() if p is None]


def _missing_error(root: Path, missing: list[str], dataset: str) -> DataError:
    raw = raw_dir(root, dataset)
    absent = (
        "none of them is there" if len(missing) == len(FILES) else f"{', '.join(missing)} missing"
    )
    return DataError(
        f"{spec(dataset).folder} needs {', '.join(FILES.values())} (.gz or uncompressed) in "
        f"{raw} but {absent}; copy them there, point data.root at a directory that holds "
        f"{raw.parent.name}/raw, or set data.download=true to download them"
    )


def _download(root: Path, missing: list[str], dataset: str, mirrors: list[str]) -> None:
    """Fetch the `missing` files from `mirrors` (else the dataset's own) into the raw dir."""
    ds, raw = spec(dataset), raw_dir(root, dataset).absolute()
    what_to_do = (
        f"copy {', '.join(name + '.gz' for name in missing)} (.gz or uncompressed) into {raw} "
        "by hand, or set data.mirrors to URLs (comma-separated) of mirrors that serve them"
    )
    fetch.fetch_all(
        raw, [ds.remote(name) for name in missing], mirrors or list(ds.mirrors), what_to_do
    )


def _fingerprint(paths: dict[tuple[str, str], Path]) -> dict[str, list[Any]]:
    # Size and mtime tell a changed file without re-hashing 55 MB on every start.
    stats = {FILES[key]: (p, p.stat()) for key, p in paths.items()}
    return {name: [p.name, st.st_size, st.st_mtime_ns] for name, (p, st) in stats.items()}


def _cache_paths(root: Path, dataset: str) -> list[Path]:
    """Beside the raw files first; per-user fallback for a read-only data root."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    name = f"{dataset}-v{CACHE_VERSION}.pt"
    return [raw_dir(root, dataset).parent / "cache" / name, base / "lenet-ddp" / digest / name]


def _writable(directory: Path) -> bool:
    """Whether `directory` exists writable, or could be created in its nearest existing parent."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK)


def _load_cache(path: Path) -> dict[str, Any]:
    """The cache at `path`, checked structurally; DataError says why it cannot be used."""
    try:
        # mmap: ranks on one node share the page cache instead of each reading 55 MB.
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # damaged files raise RuntimeError, EOFError, UnpicklingError...
        raise DataError(
            f"MNIST cache {path} is unreadable ({describe(e, with_type=True)}); "
            "run prepare to rebuild it"
        ) from e
    meta = obj.get("meta") if isinstance(obj, dict) else None
    if not isinstance(meta, dict) or meta.get("version") != CACHE_VERSION:
        problem = f"is not a version-{CACHE_VERSION} MNIST cache"
    elif not all(
        _split_ok(obj.get(f"{s}_images"), obj.get(f"{s}_labels")) for s in CANONICAL_COUNT
    ):
        problem = "holds tensors of the wrong type or shape"
    else:
        return obj
    raise DataError(f"MNIST cache {path} {problem}; run prepare to rebuild it")


def _split_ok(images: Any, labels: Any) -> bool:
    if not (isinstance(images, torch.Tensor) and isinstance(labels, torch.Tensor)):
        return False
    got = (images.dtype, images.shape[1:], labels.dtype, labels.shape)
    return got == (torch.uint8, (28, 28), torch.int64, images.shape[:1])


def _decode(
    paths: dict[tuple[str, str], Path], verify_md5: bool, dataset: str
) -> dict[str, torch.Tensor]:
    """Read and check all four files; uint8 images [N, 28, 28] and int64 labels [N] per split."""
    out: dict[str, torch.Tensor] = {}
    for split in ("train", "test"):
        arrays: dict[str, tuple[Path, np.ndarray]] = {}
        for kind in ("images", "labels"):
            name = FILES[(split, kind)]
            found, data = _read_bytes(paths[(split, kind)])
            count = int.from_bytes(data[4:8], "big") if len(data) >= 8 else -1
            # The MD5 rule: a file whose header claims the canonical count (60000/10000) must be
            # the canonical file, so its MD5 is checked where one is known; smaller IDX files
            # (test fixtures, custom subsets) have no reference sum and get the structural checks.
            canonical = verify_md5 and count == CANONICAL_COUNT[split]
            md5 = spec(dataset).raw_md5[name] if canonical else None
            array = _parse(
                found, data, expected_magic=MAGIC[kind], expected_count=None, expected_md5=md5
            )
            arrays[kind] = found, array
        (image_path, images), (label_path, labels) = arrays["images"], arrays["labels"]
        if len(labels) != len(images):
            raise DataError(
                f"MNIST file {label_path} holds {len(labels)} labels but {image_path.name} holds "
                f"{len(images)} images; the two must come from the same set: replace both"
            )
        out[f"{split}_images"] = torch.from_numpy(images)
        out[f"{split}_labels"] = torch.from_numpy(labels.astype(np.int64))
    return out


def prepare(
    root: str | os.PathLike[str],
    *,
    download: bool,
    verify_md5: bool = True,
    dataset: str = "mnist",
    mirrors: Sequence[str] = (),
) -> Path | None:
    """Make sure a valid cache of `dataset` exists for `root`; run it in one process per node.

    Idempotent and fast when the cache matches the raw files (sizes, mtimes, format version).
    Otherwise locates the raw files, downloads the missing ones when `download` (from `mirrors`
    in order, else the dataset's own), verifies them and writes the cache atomically. Returns
    the cache path, or None when no cache location is writable (then `load` decodes the raw
    files each time).
    """
    root = Path(root)
    found, missing = _raw_files(root, dataset)
    if missing and download:
        _download(root, missing, dataset, list(mirrors))
        found, missing = _raw_files(root, dataset)
    if missing:
        raise _missing_error(root, missing, dataset)
    fingerprint = _fingerprint(found)
    for cache in _cache_paths(root, dataset):
        if cache.is_file():
            try:
                meta = _load_cache(cache)["meta"]
            except DataError:
                continue  # corrupt or old: rebuilt below
            if meta.get("raw") == fingerprint and (meta.get("verify_md5") or not verify_md5):
                return cache
    payload: dict[str, Any] = dict(_decode(found, verify_md5, dataset))
    payload["meta"] = {
        "version": CACHE_VERSION,
        "dataset": dataset,
        "raw": fingerprint,
        "verify_md5": verify_md5,
    }
    for cache in _cache_paths(root, dataset):
        try:
            # Several nodes may share `root`: each writes its own temp file, the last rename wins,
            # and every version is complete and identical.
            _atomic_write(cache, lambda f: torch.save(payload, f))
            return cache
        except (OSError, RuntimeError):  # read-only or full disk; torch wraps some as RuntimeError
            continue
    return None


def load(root: str | os.PathLike[str], dataset: str = "mnist") -> dict[str, torch.Tensor]:
    """The cached dataset on CPU: train_images, train_labels, test_images, test_labels.

    `prepare(root, ..., dataset=dataset)` must have run first (one process per node). Raises
    DataError when the cache is missing, damaged or older than the raw files.
    """
    root = Path(root)
    found, missing = _raw_files(root, dataset)
    if missing:
        raise _missing_error(root, missing, dataset)
    fingerprint = _fingerprint(found)
    caches = _cache_paths(root, dataset)
    problem: DataError | None = None
    for cache in filter(Path.is_file, caches):
        try:
            obj = _load_cache(cache)
        except DataError as e:
            problem = problem or e
            continue
        if obj["meta"].get("raw") == fingerprint:
            return {k: obj[k] for k in _KEYS}
        problem = problem or DataError(
            f"MNIST cache {cache} was built from other raw files than those now in "
            f"{raw_dir(root, dataset)}; run prepare to rebuild it"
        )
    if problem is not None:
        raise problem
    if not any(_writable(c.parent) for c in caches):
        return _decode(found, True, dataset)  # prepare could not write a cache either
    raise DataError(
        f"no {spec(dataset).folder} cache for {root} (looked for "
        f"{' and '.join(map(str, caches))}); run prepare(root, download=...) in one process per "
        "node before load"
    )
