"""Your own digit images as the model's input (what `python -m pipeline.predict` classifies).

Each image is made to look like an MNIST digit, the way MNIST's were made: grayscale (a
transparent background counts as white); a dark digit on a light background inverted, as MNIST
digits are light on black; the background level taken off and the contrast stretched; the digit
cropped, fitted into 20x20 pixels keeping its aspect ratio, and placed in 28x28 with its centre
of mass at the centre. Then the pipeline's own padding and normalisation
(`pipeline.data.device.normalize_and_pad`). Reading images needs Pillow (the project's
`predict` extra).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.data.device import MEAN, STD, normalize_and_pad
from pipeline.errors import DataError, PipelineError, describe

SIDE, BOX = 28, 20  # MNIST's image side, and the box its digits are fitted into
NOISE = 0.1  # after stretching, levels under this fraction of the peak count as background
BLANK = 24  # a digit differs from its background by at least this much (of 255)


def import_pil():
    try:
        from PIL import Image, ImageOps
    except ImportError as e:
        raise PipelineError(
            "predict needs Pillow to read images (the project's predict extra): pip install pillow"
        ) from e
    return Image, ImageOps


def read_gray(path: Path) -> np.ndarray:
    """The image at `path` as float32 grayscale levels 0..255 (transparency over white)."""
    Image, ImageOps = import_pil()
    if not path.is_file():
        raise DataError(f"image {path} does not exist; pass the path of a PNG, JPEG, ... file")
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)  # photos: the orientation the camera recorded
            if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
                rgba = img.convert("RGBA")
                img = Image.new("RGBA", rgba.size, "white")
                img.alpha_composite(rgba)
            return np.asarray(img.convert("L"), dtype=np.float32)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(
            f"image {path} cannot be read ({describe(e)}); pass a PNG, JPEG, ... file"
        ) from e


def to_mnist(gray: np.ndarray, name: str = "image") -> np.ndarray:
    """A grayscale digit as MNIST draws one: uint8 [28, 28], light digit on black, fitted in
    20x20 and centred by centre of mass."""
    Image, _ = import_pil()
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    background = float(np.median(border))
    if background > 127:  # a dark digit on a light background: invert
        gray, background = 255 - gray, 255 - background
    x = np.clip(gray - background, 0, None)
    if x.max() < BLANK:
        raise DataError(f"{name} shows no digit (it is blank, or of one even shade)")
    x = x / x.max()
    x[x < NOISE] = 0
    rows, cols = np.nonzero(x.any(1))[0], np.nonzero(x.any(0))[0]
    x = x[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    h, w = x.shape
    scale = BOX / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    patch = Image.fromarray(np.round(x * 255).astype(np.uint8)).resize(
        size, Image.Resampling.LANCZOS
    )
    patch = np.asarray(patch, dtype=np.float32)
    # Centre of mass to the centre (pixel 14 of 28, where MNIST's digits have theirs).
    ys, xs = np.indices(patch.shape)
    mass = max(float(patch.sum()), 1e-6)
    cy, cx = (ys * patch).sum() / mass, (xs * patch).sum() / mass
    top = int(np.clip(round(SIDE / 2 - cy), 0, SIDE - patch.shape[0]))
    left = int(np.clip(round(SIDE / 2 - cx), 0, SIDE - patch.shape[1]))
    out = np.zeros((SIDE, SIDE), dtype=np.float32)
    out[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return np.clip(np.round(out), 0, 255).astype(np.uint8)


def prepare(paths: list[Path]) -> torch.Tensor:
    """The images at `paths` as the model's input, float32 [N, 1, 32, 32]."""
    digits = np.stack([to_mnist(read_gray(p), f"image {p}") for p in paths])
    return normalize_and_pad(torch.from_numpy(digits), torch.device("cpu"))


def save_inputs(x: torch.Tensor, images: list[Path], out: Path) -> None:
    """Write what the model saw for each image, as 28x28 PNGs (MNIST's look: light on black)."""
    Image, _ = import_pil()
    out.mkdir(parents=True, exist_ok=True)
    levels = ((x[:, 0, 2:-2, 2:-2] * STD + MEAN) * 255).round().clamp(0, 255).byte().numpy()
    for i, (image, pixels) in enumerate(zip(images, levels, strict=True)):
        Image.fromarray(pixels).save(out / f"{i:03d}-{image.stem}.png")
    print(f"the model's inputs are in {out}")
