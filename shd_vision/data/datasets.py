"""The data sets: Fashion-MNIST (Debian's idx files), image folders, scikit-learn digits, synthetic.

Each returns items ``(image, label)`` with a PIL image, except the synthetic set, whose tensors
are already sized and normalised. Each carries ``classes`` (names) and ``channels`` (1 or 3).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from shd_vision.errors import UserError

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FASHION_FILES = {"train": "train", "test": "t10k"}


class ArrayDataset(Dataset):
    """Images held in memory as a uint8 array ``[N, H, W]`` with integer labels."""

    channels = 1

    def __init__(self, images: np.ndarray, labels: np.ndarray, classes: Sequence[str],
                 transform: Optional[Callable] = None):
        self.images, self.labels, self.classes = images, labels.astype(np.int64), list(classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = Image.fromarray(self.images[i])
        return (self.transform(image) if self.transform else image), int(self.labels[i])


def read_idx(path: Path) -> np.ndarray:
    """Read a gzipped idx file (the MNIST format): big-endian header, then uint8 data."""
    with gzip.open(path, "rb") as f:
        magic = struct.unpack(">I", f.read(4))[0]
        if magic >> 8 != 0x08:  # 0x08 is the uint8 data type
            raise UserError(f"{path} is not a uint8 idx file (magic number {magic:#x}).")
        shape = struct.unpack(f">{magic & 0xFF}I", f.read(4 * (magic & 0xFF)))
        return np.frombuffer(f.read(), dtype=np.uint8).reshape(shape)


def fashion_mnist(root: str, split: str) -> ArrayDataset:
    """Fashion-MNIST ``train`` (60k) or ``test`` (10k) from the gzipped idx files in ``root``."""
    if split not in _FASHION_FILES:
        raise UserError(f"Fashion-MNIST has no split '{split}'; use one of: train, test.")
    prefix = _FASHION_FILES[split]
    images = Path(root) / f"{prefix}-images-idx3-ubyte.gz"
    labels = Path(root) / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise UserError(
            f"Fashion-MNIST files are missing: data.root={root} has no {images.name} and "
            f"{labels.name}. Install Debian's package (apt-get install dataset-fashion-mnist, which "
            "puts them in /usr/share/datasets/fashion-mnist; scripts/install.sh does it), or point "
            "data.root at a folder holding the four *-ubyte.gz files.")
    return ArrayDataset(read_idx(images), read_idx(labels), FASHION_MNIST_CLASSES)


def digits(split: str) -> ArrayDataset:
    """scikit-learn's bundled 8x8 digits (1,797 images), split 80/20 by a fixed permutation."""
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise UserError(f"digits has no split '{split}'; use one of: train, test.")
    bunch = load_digits()
    images = np.clip(bunch.images * 16, 0, 255).astype(np.uint8)  # 0..16 grey levels to 0..255
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    keep = order[:cut] if split == "train" else order[cut:]
    return ArrayDataset(images[keep], bunch.target[keep], [str(c) for c in range(10)])


# Starts the message of UnreadableImage; a loader worker's copy is found again by it.
UNREADABLE = "unreadable image file "


class UnreadableImage(UserError):
    """An image file PIL cannot decode. One message argument, so that a loader worker can re-raise
    it in the main process (with its traceback folded into the message: see :func:`unreadable_message`)."""


def unreadable_message(e: BaseException) -> str:
    """``unreadable image file <path> (<reason>)``, also out of a worker's re-raised copy."""
    lines = [line for line in str(e).splitlines() if UNREADABLE in line]
    return lines[-1][lines[-1].index(UNREADABLE):] if lines else str(e)


class _ImageFolderSplit(ImageFolder):
    channels = 3  # the default loader converts every image to RGB

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's decode errors
            reason = (str(e).strip().splitlines() or [""])[0]
            raise UnreadableImage(f"{UNREADABLE}{self.samples[index][0]} ({type(e).__name__}: {reason})") from None


def image_folder(root: str, split: str) -> ImageFolder:
    """``root/<split>/<class>/<image>``, the ImageNet layout."""
    split_dir = Path(root) / split
    layout = ("expected the ImageNet layout: data.root/train/<class>/<images> and "
              "data.root/val/<class>/<images> (split names set by data.train_split/data.val_split)")
    if not Path(root).is_dir():
        raise UserError(f"data.root={root} is not a directory; {layout}.")
    if not split_dir.is_dir():
        raise UserError(f"data.root={root} has no '{split}' folder; {layout}.")
    try:
        return _ImageFolderSplit(str(split_dir))
    except (FileNotFoundError, RuntimeError) as e:
        raise UserError(f"data.root={root}: the '{split}' folder holds no images in class "
                        f"folders ({e}); {layout}.") from None


class SyntheticDataset(Dataset):
    """Random normal images, already normalised, with random labels; item ``i`` is always the same."""

    def __init__(self, length: int, num_classes: int, seed: int = 0):
        self.length, self.seed = length, seed
        self.input_size: Optional[Tuple[int, int, int]] = None  # set to the student's by the loaders
        self.classes: List[str] = [str(c) for c in range(num_classes)]
        self.labels = torch.randint(num_classes, (length,), generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return torch.randn(self.input_size, generator=g), int(self.labels[i])
