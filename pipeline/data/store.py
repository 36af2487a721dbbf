"""A dataset's IDX files -> verified uint8 tensors, cached so that every rank loads them fast.

Three datasets share the format and the file names: MNIST, Fashion-MNIST and Kuzushiji-MNIST
(`pipeline.data.catalog`). One process per node calls `prepare(root, download=..., dataset=...)`:
it finds the IDX files of the splits asked for under `<root>/<Folder>/raw` (torchvision's
layout, `.gz` or uncompressed), downloads those missing from the mirrors
(`pipeline.data.download`), checks their structure and MD5 sums, and writes one cache per split,
`<root>/<Folder>/cache/<dataset>-<split>-v2.pt`. Every process then calls `load(root, dataset,
splits)`, which maps those caches into memory. Errors are `DataError`s with one line that names
the file and says what to do; nothing here prints (downloads report on stderr).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.atomic import write_atomic
from pipeline.data.catalog import FILES, spec
from pipeline.data.download import fetch_all
from pipeline.data.idx import MAGIC, locate, parse, read_bytes
from pipeline.errors import DataError, describe

SPLITS = ("train", "test")
CANONICAL_COUNT: dict[str, int] = {"train": 60000, "test": 10000}
CACHE_VERSION = 2  # bump when the cache layout changes; older caches are then ignored


def raw_dir(root: str | os.PathLike[str], dataset: str = "mnist") -> Path:
    """Where the IDX files live: `<root>/<Folder>/raw` (MNIST, FashionMNIST, KMNIST), as
    torchvision lays them out."""
    return Path(root) / spec(dataset).folder / "raw"


def _check_root(root: Path) -> None:
    if root.exists() and not root.is_dir():
        raise DataError(
            f"data.root={root} is a file, not a directory; point data.root at the directory "
            "that holds MNIST/raw (or FashionMNIST/raw, KMNIST/raw)"
        )


def _raw_files(
    root: Path, dataset: str, splits: Sequence[str]
) -> tuple[dict[tuple[str, str], Path], list[str]]:
    """The raw files of `splits` found under `root`, and the names of those missing."""
    _check_root(root)
    keys = [(split, kind) for split in splits for kind in ("images", "labels")]
    # Uncompressed first: that is what torchvision reads, and it needs no decompression.
    located = {key: locate(raw_dir(root, dataset) / FILES[key]) for key in keys}
    found = {key: p for key, p in located.items() if p is not None}
    return found, [FILES[key] for key, p in located.items() if p is None]


def _missing_error(root: Path, missing: list[str], dataset: str, wanted: int) -> DataError:
    raw = raw_dir(root, dataset)
    absent = "none of them is there" if len(missing) == wanted else f"{', '.join(missing)} missing"
    needed = [name for name in FILES.values() if name in missing] if wanted < len(FILES) else None
    return DataError(
        f"{spec(dataset).folder} needs {', '.join(needed or FILES.values())} (.gz or "
        f"uncompressed) in {raw} but {absent}; copy them there, point data.root at a directory "
        f"that holds {raw.parent.name}/raw, or set data.download=true to download them"
    )


def _download(root: Path, missing: list[str], dataset: str, mirrors: list[str]) -> None:
    """Fetch the `missing` files from `mirrors` (else the dataset's own) into the raw dir."""
    ds, raw = spec(dataset), raw_dir(root, dataset).absolute()
    what_to_do = (
        f"copy {', '.join(name + '.gz' for name in missing)} (.gz or uncompressed) into {raw} "
        "by hand, or set data.mirrors to URLs (comma-separated) of mirrors that serve them"
    )
    fetch_all(raw, [ds.remote(name) for name in missing], mirrors or list(ds.mirrors), what_to_do)


def _fingerprint(paths: dict[tuple[str, str], Path], split: str) -> dict[str, list[Any]]:
    # Size and mtime tell a changed file without re-hashing 55 MB on every start.
    stats = {FILES[key]: (p, p.stat()) for key, p in paths.items() if key[0] == split}
    return {name: [p.name, st.st_size, st.st_mtime_ns] for name, (p, st) in stats.items()}


def _cache_paths(root: Path, dataset: str, split: str) -> list[Path]:
    """Beside the raw files first; per-user fallback for a read-only data root."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    name = f"{dataset}-{split}-v{CACHE_VERSION}.pt"
    return [raw_dir(root, dataset).parent / "cache" / name, base / "lenet-ddp" / digest / name]


def _writable(directory: Path) -> bool:
    """Whether `directory` exists writable, or could be created in its nearest existing parent."""
    while not directory.exists() and directory != directory.parent:
        directory = directory.parent
    return directory.is_dir() and os.access(directory, os.W_OK)


def _load_cache(path: Path, split: str) -> dict[str, Any]:
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
    elif not _split_ok(obj.get(f"{split}_images"), obj.get(f"{split}_labels")):
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
    paths: dict[tuple[str, str], Path], verify_md5: bool, dataset: str, split: str
) -> dict[str, torch.Tensor]:
    """Read and check a split's two files: uint8 images [N, 28, 28] and int64 labels [N]."""
    arrays: dict[str, tuple[Path, np.ndarray]] = {}
    for kind in ("images", "labels"):
        name = FILES[(split, kind)]
        found, data = read_bytes(paths[(split, kind)])
        count = int.from_bytes(data[4:8], "big") if len(data) >= 8 else -1
        # The MD5 rule: a file whose header claims the canonical count (60000/10000) must be
        # the canonical file, so its MD5 is checked where one is known; smaller IDX files
        # (test fixtures, custom subsets) have no reference sum and get the structural checks.
        canonical = verify_md5 and count == CANONICAL_COUNT[split]
        md5 = spec(dataset).raw_md5[name] if canonical else None
        array = parse(
            found, data, expected_magic=MAGIC[kind], expected_count=None, expected_md5=md5
        )
        arrays[kind] = found, array
    (image_path, images), (label_path, labels) = arrays["images"], arrays["labels"]
    if len(labels) != len(images):
        raise DataError(
            f"MNIST file {label_path} holds {len(labels)} labels but {image_path.name} holds "
            f"{len(images)} images; the two must come from the same set: replace both"
        )
    return {
        f"{split}_images": torch.from_numpy(images),
        f"{split}_labels": torch.from_numpy(labels.astype(np.int64)),
    }


def _check_splits(splits: Sequence[str]) -> None:
    if not splits or any(s not in SPLITS for s in splits):
        raise ValueError(f"splits must be some of {SPLITS}, not {tuple(splits)}")


def prepare(
    root: str | os.PathLike[str],
    *,
    download: bool,
    verify_md5: bool = True,
    dataset: str = "mnist",
    mirrors: Sequence[str] = (),
    splits: Sequence[str] = SPLITS,
) -> list[Path | None]:
    """Make sure a valid cache of each of `dataset`'s `splits` exists for `root`; run it in one
    process per node.

    Idempotent and fast when a cache matches the raw files (sizes, mtimes, format version).
    Otherwise locates the raw files, downloads the missing ones when `download` (from `mirrors`
    in order, else the dataset's own), verifies them and writes the cache atomically. Returns
    each split's cache path, None where no cache location is writable (then `load` decodes the
    raw files each time).
    """
    _check_splits(splits)
    root = Path(root)
    found, missing = _raw_files(root, dataset, splits)
    if missing and download:
        _download(root, missing, dataset, list(mirrors))
        found, missing = _raw_files(root, dataset, splits)
    if missing:
        raise _missing_error(root, missing, dataset, 2 * len(splits))
    return [_prepare_split(root, found, verify_md5, dataset, split) for split in splits]


def _prepare_split(
    root: Path, found: dict, verify_md5: bool, dataset: str, split: str
) -> Path | None:
    fingerprint = _fingerprint(found, split)
    for cache in _cache_paths(root, dataset, split):
        if cache.is_file():
            try:
                meta = _load_cache(cache, split)["meta"]
            except DataError:
                continue  # corrupt or old: rebuilt below
            if meta.get("raw") == fingerprint and (meta.get("verify_md5") or not verify_md5):
                return cache
    payload: dict[str, Any] = dict(_decode(found, verify_md5, dataset, split))
    payload["meta"] = {
        "version": CACHE_VERSION,
        "dataset": dataset,
        "split": split,
        "raw": fingerprint,
        "verify_md5": verify_md5,
    }
    for cache in _cache_paths(root, dataset, split):
        try:
            # Several nodes may share `root`: each writes its own temp file, the last rename wins,
            # and every version is complete and identical.
            cache.parent.mkdir(parents=True, exist_ok=True)
            return write_atomic(cache, lambda f: torch.save(payload, f))
        except (OSError, RuntimeError):  # read-only or full disk; torch wraps some as RuntimeError
            continue
    return None


def load(
    root: str | os.PathLike[str], dataset: str = "mnist", splits: Sequence[str] = SPLITS
) -> dict[str, torch.Tensor]:
    """The cached splits on CPU: `<split>_images` and `<split>_labels` for each split.

    `prepare(root, ..., dataset=dataset, splits=...)` must have run first (one process per
    node). Raises DataError when a cache is missing, damaged or older than the raw files.
    """
    _check_splits(splits)
    root = Path(root)
    found, missing = _raw_files(root, dataset, splits)
    if missing:
        raise _missing_error(root, missing, dataset, 2 * len(splits))
    out: dict[str, torch.Tensor] = {}
    for split in splits:
        out.update(_load_split(root, found, dataset, split))
    return out


def _load_split(root: Path, found: dict, dataset: str, split: str) -> dict[str, torch.Tensor]:
    fingerprint = _fingerprint(found, split)
    caches = _cache_paths(root, dataset, split)
    problem: DataError | None = None
    keys = (f"{split}_images", f"{split}_labels")
    for cache in filter(Path.is_file, caches):
        try:
            obj = _load_cache(cache, split)
        except DataError as e:
            problem = problem or e
            continue
        if obj["meta"].get("raw") == fingerprint:
            return {k: obj[k] for k in keys}
        problem = problem or DataError(
            f"MNIST cache {cache} was built from other raw files than those now in "
            f"{raw_dir(root, dataset)}; run prepare to rebuild it"
        )
    if problem is not None:
        raise problem
    if not any(_writable(c.parent) for c in caches):
        return _decode(found, True, dataset, split)  # prepare could not write a cache either
    raise DataError(
        f"no {spec(dataset).folder} {split} cache for {root} (looked for "
        f"{' and '.join(map(str, caches))}); run prepare(root, download=...) in one process per "
        "node before load"
    )
