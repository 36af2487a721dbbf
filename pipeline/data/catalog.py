"""The MNIST-format datasets: their file names, folders, public mirrors and checksums.

MNIST, Fashion-MNIST and Kuzushiji-MNIST have the same four IDX files (the same names and
sizes), each set in its own folder under the data root, as torchvision lays them out. The
mirrors and the MD5s of the .gz files are torchvision's; the MD5s of the decompressed files are
known for MNIST only, and those are what a re-compressed copy is checked against.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.download import Remote

FILES: dict[tuple[str, str], str] = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
# Size and MD5 of MNIST's *decompressed* canonical files: mirrors re-compress the .gz wrappers,
# so only the content has a stable checksum. (Every set here has these sizes.)
CANONICAL: dict[str, tuple[int, str]] = {
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}


@dataclass(frozen=True)
class Dataset:
    """An MNIST-format dataset as torchvision knows it: its folder under the data root, its
    public mirrors, and the MD5s of its .gz files and, where known, of their content."""

    folder: str
    mirrors: tuple[str, ...]
    gz_md5: dict[str, str]
    raw_md5: dict[str, str | None]

    def remote(self, name: str) -> Remote:
        return Remote(name + ".gz", self.gz_md5[name], self.raw_md5[name])


_NO_RAW_MD5 = dict.fromkeys(CANONICAL)
# The mirrors and .gz MD5s are those of torchvision.datasets.MNIST, FashionMNIST and KMNIST.
DATASETS: dict[str, Dataset] = {
    "mnist": Dataset(
        "MNIST",
        ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
        {
            "train-images-idx3-ubyte": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        {name: md5 for name, (_, md5) in CANONICAL.items()},
    ),
    "fashion_mnist": Dataset(
        "FashionMNIST",
        ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        {
            "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
            "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
            "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
            "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
        },
        _NO_RAW_MD5,
    ),
    "kmnist": Dataset(
        "KMNIST",
        ("http://codh.rois.ac.jp/kmnist/dataset/kmnist/",),
        {
            "train-images-idx3-ubyte": "bdb82020997e1d708af4cf47b453dcf7",
            "train-labels-idx1-ubyte": "e144d726b3acfaa3e44228e80efcd344",
            "t10k-images-idx3-ubyte": "5c965bf0a639b31b8f53240b1b52f4d7",
            "t10k-labels-idx1-ubyte": "7320c461ea6c1c855c0b718fb2a4b134",
        },
        _NO_RAW_MD5,
    ),
}


def spec(name: str) -> Dataset:
    """The dataset called `name` (a data.dataset value)."""
    try:
        return DATASETS[name]
    except KeyError:
        raise ValueError(
            f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}"
        ) from None
