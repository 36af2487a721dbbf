"""Downloading the dataset, without a server: the checksum rule, the progress line, every
dataset's checksums and mirrors, the config of mirrors, and what is refused before any download.
The downloads themselves, from a local mirror server of the real files, are in
tests/integration/test_download.py."""

from __future__ import annotations

import gzip
import hashlib
import io
from pathlib import Path

import pytest

from pipeline.config.schema import load_config
from pipeline.data import download, store
from pipeline.data.catalog import DATASETS, FILES
from pipeline.data.download import Remote, check
from pipeline.errors import ConfigError, DataError

from helpers import write_tiny_mnist


@pytest.fixture(autouse=True)
def _private_cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


# -- the checksum rule ------------------------------------------------------------------------


def test_gz_checksum_match_is_accepted() -> None:
    gz = gzip.compress(b"some content", mtime=0)
    assert check(gz, Remote("f.gz", md5(gz), raw_md5=None)) is None


def test_recompressed_file_is_accepted_on_its_content() -> None:
    # A mirror's own compression: other .gz bytes, the same content.
    original = gzip.compress(b"some content", mtime=0, compresslevel=9)
    mirror = gzip.compress(b"some content", mtime=12345, compresslevel=1)
    assert md5(mirror) != md5(original)
    assert check(mirror, Remote("f.gz", md5(original), md5(b"some content"))) is None
    # Without a known checksum of the content there is nothing to accept it on.
    why = check(mirror, Remote("f.gz", md5(original), None))
    assert why is not None and "no checksum of its decompressed content" in why


def test_content_served_decompressed_is_accepted_and_kept_uncompressed() -> None:
    remote = Remote("f.gz", md5(gzip.compress(b"content")), md5(b"content"))
    assert check(b"content", remote) is None
    assert download.stored_name(b"content", remote) == "f"
    assert download.stored_name(gzip.compress(b"content"), remote) == "f.gz"


def test_neither_checksum_is_refused_with_both_sums() -> None:
    remote = Remote("f.gz", "0" * 32, md5(b"right"))
    wrong = gzip.compress(b"wrong")
    why = check(wrong, remote)
    assert why == (
        f"MD5 {md5(wrong)} is not the canonical {'0' * 32}, nor is MD5 {md5(b'wrong')} "
        f"of its content the canonical {md5(b'right')}"
    )
    cut = check(wrong[:-6], remote)  # a truncated gzip: no content to compare
    assert cut is not None and "does not decompress" in cut


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_one_line() -> None:
    # pooch's protocol: total set, update per chunk (it may overshoot), reset, update, close.
    for stream, expected in (
        (io.StringIO(), "downloading u (2.0 MB)\n"),
        (Terminal(), "\rdownloading u: 1.0 MB of 2.0 MB\rdownloading u: 2.0 MB of 2.0 MB\n"),
    ):
        progress = download.Progress("u", stream)
        progress.total = 2_000_000
        progress.update(1_000_000)
        progress.update(1_500_000)
        progress.reset()
        progress.update(2_000_000)
        progress.close()
        assert stream.getvalue() == expected


def test_every_dataset_has_a_checksum_for_every_file() -> None:
    for name, ds in DATASETS.items():
        assert ds.mirrors and all(m.startswith(("http://", "https://")) for m in ds.mirrors)
        for raw in FILES.values():
            remote = ds.remote(raw)
            assert remote.name == raw + ".gz" and len(remote.gz_md5) == 32, name
    assert all(md5 is not None for md5 in DATASETS["mnist"].raw_md5.values())


def test_mirrors_and_dataset_config() -> None:
    cfg = load_config(None, ["data.mirrors= http://a/mnist/ ,https://b/,", "data.dataset=kmnist"])
    assert cfg.data.mirror_list() == ["http://a/mnist/", "https://b/"]
    assert load_config(None, []).data.mirror_list() == []
    with pytest.raises(ConfigError, match="data.mirrors: 'ftp://a/' is not an http"):
        load_config(None, ["data.mirrors=http://a/,ftp://a/"])
    with pytest.raises(ConfigError, match="data.dataset: 'cifar10' is not allowed"):
        load_config(None, ["data.dataset=cifar10"])


# -- what is refused before any download -----------------------------------------------------


def test_no_mirrors_left_is_one_line(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="^no mirrors to download from; copy them"):
        download.fetch_all(tmp_path, [], [], "copy them")


def test_download_false_does_not_download(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="set data.download=true to download them"):
        store.prepare(tmp_path, download=False, mirrors=["http://127.0.0.1:9/"])
    assert not (tmp_path / "MNIST").exists()


def test_other_datasets_live_in_their_own_folder(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path)
    (tmp_path / "MNIST").rename(tmp_path / "KMNIST")
    caches = store.prepare(tmp_path, download=False, dataset="kmnist")
    assert caches == [
        tmp_path / "KMNIST" / "cache" / f"kmnist-{s}-v2.pt" for s in ("train", "test")
    ]
    assert store.load(tmp_path, "kmnist")["train_images"].shape == (512, 28, 28)
    with pytest.raises(DataError, match=f"^MNIST needs .* in {tmp_path / 'MNIST' / 'raw'} but"):
        store.prepare(tmp_path, download=False)
    assert store.load(tmp_path, "kmnist")["test_labels"].unique().numel() == 10
