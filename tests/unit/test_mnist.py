"""pipeline.data.idx and pipeline.data.store: IDX reading and checks, the cache, error messages,
on tiny IDX files the tests write (64 train / 32 test images). The real MNIST is read in
tests/integration/test_mnist.py; downloading is tested in tests/unit/test_download.py and
tests/integration/test_download.py."""

from __future__ import annotations

import gzip
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.catalog import CANONICAL, FILES
from pipeline.data.idx import parse, read_bytes
from pipeline.data.store import load, prepare, raw_dir
from pipeline.errors import DataError

from helpers import count_decodes, identity, write_idx

N_TRAIN, N_TEST = 64, 32
TRAIN_IMAGES = FILES[("train", "images")]
TRAIN_LABELS = FILES[("train", "labels")]
TEST_LABELS = FILES[("test", "labels")]


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The fallback cache lives under $XDG_CACHE_HOME: keep tests out of the real ~/.cache.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def make_mnist(root: Path, *, gz: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """Write a small, valid MNIST under root/MNIST/raw and return its arrays."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", N_TRAIN), ("test", N_TEST)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 10, n, dtype=np.uint8)
        for kind in ("images", "labels"):
            write_idx(raw_dir(root) / FILES[(split, kind)], arrays[f"{split}_{kind}"], gz=gz)
    return arrays


def assert_one_line_naming(err: pytest.ExceptionInfo[DataError], name: str) -> None:
    message = str(err.value)
    assert name in message, message
    assert "\n" not in message, message
    assert err.value.exit_code == 3


@pytest.mark.parametrize("gz", [True, False], ids=["gz", "raw"])
def test_round_trip(tmp_path: Path, gz: bool) -> None:
    arrays = make_mnist(tmp_path, gz=gz)
    cache = prepare(tmp_path, download=False)[0]
    assert cache == tmp_path / "MNIST" / "cache" / "mnist-train-v2.pt"
    data = load(tmp_path)
    assert set(data) == set(arrays)
    for key, array in arrays.items():
        expected = torch.from_numpy(array.astype(np.int64) if "labels" in key else array)
        assert data[key].dtype == expected.dtype and data[key].device.type == "cpu"
        assert torch.equal(data[key], expected), key


def test_an_idx_file_is_read_in_either_form_of_the_name(tmp_path: Path) -> None:
    labels = np.arange(10, dtype=np.uint8)
    write_idx(tmp_path / "a-labels", labels, gz=True)
    write_idx(tmp_path / "b-labels", labels)
    assert (tmp_path / "a-labels.gz").is_file()
    for path in (tmp_path / "a-labels", tmp_path / "a-labels.gz", tmp_path / "b-labels.gz"):
        got = parse(*read_bytes(path), expected_magic=2049, expected_count=10, expected_md5=None)
        assert np.array_equal(got, labels)


def test_second_prepare_reuses_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_mnist(tmp_path, gz=True)
    decodes = count_decodes(monkeypatch)
    cache = prepare(tmp_path, download=False)[0]
    before = identity(cache)
    assert prepare(tmp_path, download=False)[0] == cache
    assert decodes == [1, 1]  # once per split, the first time only
    assert identity(cache) == before


def test_changed_raw_file_makes_cache_stale_and_prepare_rebuilds(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    cache = prepare(tmp_path, download=False)[0]
    labels_path = raw_dir(tmp_path) / TRAIN_LABELS
    new_labels = (np.arange(N_TRAIN) % 10).astype(np.uint8)
    old_mtime = labels_path.stat().st_mtime_ns
    write_idx(labels_path, new_labels)  # same size: only the mtime tells
    # A coarse filesystem clock could stamp the rewrite with the old mtime; a user's edit
    # comes later than a test's, so move it on explicitly.
    os.utime(labels_path, ns=(old_mtime + 10**9, old_mtime + 10**9))
    with pytest.raises(DataError, match="run prepare") as err:
        load(tmp_path)
    assert_one_line_naming(err, str(cache))
    assert prepare(tmp_path, download=False)[0] == cache
    assert torch.equal(load(tmp_path)["train_labels"], torch.from_numpy(new_labels).long())


def test_corrupt_cache_is_rebuilt(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    arrays = make_mnist(tmp_path, gz=True)
    cache = prepare(tmp_path, download=False)[0]
    cache.write_bytes(b"this is not a torch file" * 100)
    with pytest.raises(DataError, match="run prepare") as err:
        load(tmp_path)
    assert_one_line_naming(err, str(cache))
    decodes = count_decodes(monkeypatch)
    assert prepare(tmp_path, download=False)[0] == cache
    assert decodes == [1]  # the damaged cache only
    assert torch.equal(load(tmp_path)["test_images"], torch.from_numpy(arrays["test_images"]))


def test_load_before_prepare_says_to_run_prepare(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=True)
    with pytest.raises(DataError, match="run prepare") as err:
        load(tmp_path)
    assert_one_line_naming(err, "mnist-train-v2.pt")


def test_the_test_split_alone_needs_only_its_files(tmp_path: Path) -> None:
    """What evaluation reads: the test split, cached apart, without the training files."""
    arrays = make_mnist(tmp_path, gz=False)
    for kind in ("images", "labels"):
        (raw_dir(tmp_path) / FILES[("train", kind)]).unlink()
    (cache,) = prepare(tmp_path, download=False, splits=("test",))
    assert cache.name == "mnist-test-v2.pt"
    data = load(tmp_path, splits=("test",))
    assert sorted(data) == ["test_images", "test_labels"]
    assert torch.equal(data["test_images"], torch.from_numpy(arrays["test_images"]))
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        prepare(tmp_path, download=False)
    assert_one_line_naming(err, str(raw_dir(tmp_path)))


def test_a_data_root_that_is_a_file_is_named_as_such(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.write_text("not a directory")
    with pytest.raises(DataError, match="is a file, not a directory") as err:
        prepare(root, download=True)
    assert_one_line_naming(err, str(root))


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _cut_in_half(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


CORRUPTIONS = {
    # name: (gz, file to damage, damage, words in the message)
    "bad magic": (
        False,
        TRAIN_IMAGES,
        lambda p: write_idx(p, np.zeros(N_TRAIN, dtype=np.uint8)),
        "magic number 2049",
    ),
    "truncated": (False, TRAIN_IMAGES, lambda p: p.write_bytes(p.read_bytes()[:1000]), "truncated"),
    "extra bytes": (False, TEST_LABELS, lambda p: p.write_bytes(p.read_bytes() + b"\0"), "extra"),
    "label count != image count": (
        False,
        TRAIN_LABELS,
        lambda p: write_idx(p, np.zeros(N_TRAIN - 1, dtype=np.uint8)),
        f"holds {N_TRAIN - 1} labels but {TRAIN_IMAGES} holds {N_TRAIN} images",
    ),
    "label out of range": (
        False,
        TEST_LABELS,
        lambda p: write_idx(p, np.full(N_TEST, 12, dtype=np.uint8)),
        "label 12",
    ),
    "gzip bad data": (True, TRAIN_IMAGES, _flip_middle_byte, "damaged gzip"),
    "gzip truncated": (True, TRAIN_IMAGES, _cut_in_half, "damaged gzip"),
}


@pytest.mark.parametrize("case", CORRUPTIONS)
def test_corrupt_raw_file_gives_one_line_naming_it(tmp_path: Path, case: str) -> None:
    gz, name, damage, words = CORRUPTIONS[case]
    make_mnist(tmp_path, gz=gz)
    path = raw_dir(tmp_path) / (name + ".gz" if gz else name)
    damage(path)
    with pytest.raises(DataError, match=words) as err:
        prepare(tmp_path, download=False)
    assert_one_line_naming(err, str(path))
    if gz:  # the gzip module's own exception is kept as the cause
        assert err.value.__cause__ is not None


def test_truncated_file_message_gives_sizes(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    # A header that promises the full 60000 images, followed by 1000 bytes in all.
    header = b"".join(v.to_bytes(4, "big") for v in (2051, 60000, 28, 28))
    path.write_bytes(gzip.compress(header + bytes(1000 - len(header))))
    with pytest.raises(DataError) as err:
        parse(*read_bytes(path), expected_magic=2051, expected_count=None, expected_md5=None)
    assert str(err.value).startswith(
        f"MNIST file {path} is truncated: header says 60000 images of 28x28 (47040016 bytes) "
        "but it holds 1000 bytes"
    )


def test_gzip_errors_are_chained(tmp_path: Path) -> None:
    path = tmp_path / "labels.gz"
    write_idx(path, np.zeros(100, dtype=np.uint8), gz=True)
    _cut_in_half(path)
    with pytest.raises(DataError, match="damaged gzip") as err:
        parse(*read_bytes(path), expected_magic=2049, expected_count=None, expected_md5=None)
    assert isinstance(err.value.__cause__, EOFError)


def test_md5_is_checked_when_the_count_is_canonical(tmp_path: Path) -> None:
    make_mnist(tmp_path, gz=False)
    # 10000 labels: the canonical test count, so this file must be the canonical one.
    path = raw_dir(tmp_path) / TEST_LABELS
    write_idx(path, np.zeros(10000, dtype=np.uint8))
    with pytest.raises(DataError, match="MD5") as err:
        prepare(tmp_path, download=False)
    assert_one_line_naming(err, str(path))
    assert CANONICAL[TEST_LABELS][1] in str(err.value)
    # Without MD5 verification the structural checks still catch the mismatch with the images.
    with pytest.raises(DataError, match="holds 10000 labels but"):
        prepare(tmp_path, download=False, verify_md5=False)


def test_read_idx_checks_count_and_md5(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    write_idx(path, np.zeros(7, dtype=np.uint8))
    with pytest.raises(DataError, match="holds 7 labels but 8 were expected") as err:
        parse(*read_bytes(path), expected_magic=2049, expected_count=8, expected_md5=None)
    assert_one_line_naming(err, str(path))
    with pytest.raises(DataError, match="MD5") as err:
        parse(*read_bytes(path), expected_magic=2049, expected_count=7, expected_md5="0" * 32)
    assert_one_line_naming(err, str(path))


def test_missing_files_message_lists_them_and_the_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        prepare(tmp_path, download=False)
    for name in FILES.values():
        assert_one_line_naming(err, name)
    assert_one_line_naming(err, str(raw_dir(tmp_path)))
    assert "data.download=true" in str(err.value) and "data.root" in str(err.value)

    make_mnist(tmp_path, gz=True)
    (raw_dir(tmp_path) / (TRAIN_LABELS + ".gz")).unlink()
    with pytest.raises(DataError, match=f"{TRAIN_LABELS} missing") as err:
        prepare(tmp_path, download=False)
    assert_one_line_naming(err, str(raw_dir(tmp_path)))


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_cache_file_follows_the_umask(tmp_path: Path, umask: int) -> None:
    make_mnist(tmp_path, gz=True)
    old = os.umask(umask)
    try:
        cache = prepare(tmp_path, download=False)[0]
    finally:
        os.umask(old)
    # Not tempfile's 0600: other users of a shared data root can read what the umask allows.
    assert stat.S_IMODE(cache.stat().st_mode) == 0o666 & ~umask
    names = sorted(p.name for p in cache.parent.iterdir())
    assert names == ["mnist-test-v2.pt", "mnist-train-v2.pt"]  # no temp file left


def test_cache_falls_back_to_user_cache_dir(tmp_path: Path) -> None:
    arrays = make_mnist(tmp_path, gz=True)
    # A plain file where the cache directory should be: unwritable even for root.
    (tmp_path / "MNIST" / "cache").write_text("in the way")
    cache = prepare(tmp_path, download=False)[0]
    assert cache is not None and cache.is_relative_to(tmp_path / "xdg" / "lenet-ddp")
    assert torch.equal(load(tmp_path)["train_images"], torch.from_numpy(arrays["train_images"]))


def test_no_writable_cache_means_load_decodes_raw(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    arrays = make_mnist(tmp_path, gz=True)
    (tmp_path / "MNIST" / "cache").write_text("in the way")
    (tmp_path / "not-a-dir").write_text("in the way")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "not-a-dir"))
    assert prepare(tmp_path, download=False) == [None, None]
    assert torch.equal(
        load(tmp_path)["test_labels"], torch.from_numpy(arrays["test_labels"]).long()
    )


def test_write_idx_refuses_what_is_not_mnist(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="uint8"):
        write_idx(tmp_path / "x", np.zeros(5, dtype=np.int64))
    with pytest.raises(ValueError, match="28, 28"):
        write_idx(tmp_path / "x", np.zeros((5, 32, 32), dtype=np.uint8))
