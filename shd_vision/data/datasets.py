"""The data sets: Fashion-MNIST (Debian's idx files), scikit-learn digits, synthetic, and timm's
readers (``timm.data.create_dataset``): image folders, tar archives, Hugging Face datasets and
WebDataset shards.

Each returns items ``(image, label)`` with a PIL image, except the synthetic set, whose tensors
are already sized and normalised. Each carries ``classes`` (names) and ``channels`` (1 or 3).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import tarfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from timm.data import IterableImageDataset, create_dataset
from timm.data.readers.reader_image_in_tar import extract_tarinfos
from timm.data.readers.reader_wds import ReaderWds, remap_target

from shd_vision.errors import UNREADABLE, UnreadableImage, UserError

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


class TimmImages(Dataset):
    """A map-style timm reader (folder, tar, Hugging Face dataset) that decodes its own images, so
    that a file PIL cannot decode stops the run naming it (:class:`UnreadableImage`) instead of
    being skipped silently, as timm's ``ImageDataset`` does."""

    channels = 3  # every image is converted to RGB, as timm's readers do

    def __init__(self, name: str, root: str, split: str, class_map: Optional[str] = None,
                 num_classes: Optional[int] = None):
        self.reader = create_dataset(name, root=root, split=split, search_split=False, class_map=class_map).reader
        self.where = f"{name or root}[{split}]"
        to_idx = getattr(self.reader, "class_to_idx", None) or getattr(self.reader, "class_name_to_idx", {})  # tar
        self.classes = [c for c, _ in sorted(to_idx.items(), key=lambda kv: kv[1])]
        self.numbered = not self.classes  # labels without names: classes "0".."C-1"
        if self.numbered:
            self.classes = self._numbered_classes(num_classes)
        self.transform: Optional[Callable] = None

    def _numbered_classes(self, num_classes: Optional[int]) -> List[str]:
        """Class names ``0 .. C-1`` for labels that carry no names (a Hugging Face label column of
        plain integers, as after a parquet round trip): C is ``data.num_classes`` or the largest
        label plus one."""
        dataset, key = getattr(self.reader, "dataset", None), getattr(self.reader, "label_key", "label")
        labels = list(dataset[key]) if dataset is not None and key in dataset.column_names else []
        kind = dataset.features[key] if labels else "no"
        if not labels or not all(isinstance(v, int) and v >= 0 for v in labels):
            raise UserError(
                f"data.name={self.where}: the label column '{key}' holds {kind} values, which are neither "
                "class labels with names nor class indices 0..C-1. Cast it before saving, e.g. "
                f"dataset.cast_column('{key}', datasets.ClassLabel(names=[...])), or map its values to "
                "integers 0..C-1 (then data.num_classes=C, or the largest label + 1, gives the count).")
        top = max(labels) + 1
        if num_classes is not None and num_classes < top:
            raise UserError(f"data.num_classes={num_classes} but the label column '{key}' of {self.where} "
                            f"holds label {top - 1}; set data.num_classes to at least {top}, or null.")
        return [str(c) for c in range(num_classes or top)]

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, index: int):
        file, target = self.reader[index][:2]
        try:
            image = Image.open(file).convert("RGB")  # convert decodes every pixel
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:  # PIL's decode errors
            reason = (str(e).strip().splitlines() or [""])[0]
            name = self.reader.filename(index, absolute=True) or f"{self.where} item {index}"
            raise UnreadableImage(f"{UNREADABLE}{name} ({type(e).__name__}: {reason})") from None
        finally:
            file.close()
        return (self.transform(image) if self.transform else image), int(target)


def image_folder(root: str, split: str, class_map: Optional[str] = None) -> TimmImages:
    """``root/<split>/<class>/<image>`` (the ImageNet layout) or ``root/<split>.tar`` (the same
    layout inside a tar archive), read by timm's folder and tar readers."""
    layout = ("expected the ImageNet layout: data.root/train/<class>/<images> and "
              "data.root/val/<class>/<images>, or archives of it, data.root/train.tar and data.root/val.tar "
              "(split names set by data.train_split/data.val_split)")
    if not Path(root).is_dir():
        raise UserError(f"data.root={root} is not a directory; {layout}.")
    split_dir, archive = Path(root) / split, Path(root) / f"{split}.tar"
    source = split_dir if split_dir.is_dir() else archive if archive.is_file() else None
    if source is None:
        raise UserError(f"data.root={root} has no '{split}' folder or '{split}.tar'; {layout}.")
    try:
        images = TimmImages("", str(source), split, class_map)
    except (RuntimeError, OSError) as e:  # timm: "Found 0 images in subfolders of ..."; a broken tar
        images, problem = None, (str(e).strip().splitlines() or [""])[0]
    if images is None or not len(images):
        raise UserError(f"data.root={root}: {source.name} holds no images in class folders"
                        f"{f' ({problem})' if images is None else ''}; {layout}.")
    unlisted = sorted(_class_folders(source) - set(images.classes)) if class_map else []
    if unlisted:  # timm's reader would drop their images without a word
        raise UserError(f"data.class_map={class_map} does not list the class folders {', '.join(unlisted[:5])}"
                        f"{' ...' if len(unlisted) > 5 else ''} of {source}; list every class folder, one "
                        "name per line in the teacher's order.")
    return images


def _class_folders(source: Path) -> set:
    """The class folders of a split folder, or the classes timm finds in a split archive (folders
    inside it, or one inner archive per class: another pass over its headers, which timm caches
    beside the archive where ``cache_tarinfo`` is on)."""
    if source.is_dir():
        return {p.name for p in source.iterdir() if p.is_dir()}
    return set(extract_tarinfos(str(source))[2])


def hf_dataset(name: str, root: Optional[str], split: str, class_map: Optional[str] = None,
               num_classes: Optional[int] = None) -> TimmImages:
    """A Hugging Face dataset (``hfds/<hub name or local directory>``) through timm's reader, from
    the hub cache or a local directory (``HF_DATASETS_OFFLINE=1`` keeps it off the network)."""
    try:
        return TimmImages(name, root, split, class_map, num_classes)
    except (FileNotFoundError, ValueError, ConnectionError, KeyError) as e:
        raise UserError(f"data.name={name}: the Hugging Face dataset could not be read for split "
                        f"'{split}' ({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}). Give "
                        "hfds/<hub name> with data.root=<its cache dir>, or hfds/<local directory> holding "
                        "the data files (e.g. train-*.parquet), with splits named by data.train_split/"
                        "data.val_split and image and label columns.") from None


class ShardReader(ReaderWds):
    """timm's WebDataset reader with epochs that never repeat a sample.

    timm gives every process and loader worker the same number of samples per epoch and repeats
    a worker's shards to fill it, so an epoch can count a sample twice and miss others. Here a
    training epoch streams ``per_worker`` samples per worker (set by the loaders: at most what the
    worker with the fewest samples holds), and validation streams exactly the samples of each
    worker's own shards, so every validation sample counts once for any number of processes,
    workers and shards.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_worker = 0

    def _worker_samples(self, worker: int, workers: int) -> int:
        return sum(self.split_info.shard_lengths[worker::workers])

    def _num_samples_per_worker(self) -> int:  # called by timm inside each worker
        if self.is_training:
            return self.per_worker
        return self._worker_samples(self.global_worker_id, self.global_num_workers)

    def __iter__(self):
        """Training as timm streams it; validation reads each of this worker's shards once. (timm
        cuts validation under several processes with ``with_epoch``, which restarts a worker's
        shards when a sample it skipped as undecodable left it short: a sample counted twice.)"""
        if self.is_training:
            yield from super().__iter__()
            return
        if self.ds is None:
            self._lazy_init()
        for sample in self.ds:
            target = sample["target"]
            if self.remap_class:
                target = remap_target(target, self.class_to_idx, self._source_names, dense=self.dense_target)
            yield sample["image"], target

    def __len__(self) -> int:  # this process's samples
        if self.is_training:
            return self.per_worker * self.num_workers
        first, workers = self.dist_rank * self.num_workers, self.dist_num_replicas * self.num_workers
        return sum(self._worker_samples(w, workers) for w in range(first, first + self.num_workers))


def webdataset(name: str, root: Optional[str], split: str, training: bool, batch_size: int,
               num_classes: Optional[int], class_map: Optional[str] = None) -> IterableImageDataset:
    """WebDataset shards (``wds/<name>``) through timm's reader: ``root`` holds the ``.tar`` shards
    and ``_info.json`` (per split: ``num_samples``, ``filenames``, ``shard_lengths``; optionally
    ``classes``, the class names). Samples are ``<key>.jpg|png|webp`` with ``<key>.cls``.

    An iterable data set: timm splits the shards over processes and loader workers, shuffles
    shards by epoch and samples in a buffer; a sample PIL cannot decode is skipped by timm with a
    warning (``data.skip_bad_images`` does not apply). Epochs are planned by the loaders
    (:class:`ShardReader`).
    """
    layout = ("data.root must hold the shards and an _info.json naming them per split, e.g. "
              '{"splits": {"train": {"name": "train", "num_samples": 1000, "filenames": ["train-0000.tar"], '
              '"shard_lengths": [1000]}}, "classes": [...]}')
    try:
        import webdataset  # noqa: F401  (timm's reader needs it)
    except ImportError:
        raise UserError("data.name=wds/... reads WebDataset shards with the webdataset package, which "
                        "is not installed; pip install -e '.[shards]' (webdataset).") from None
    if not root or not ((Path(root) / "_info.json").is_file() or (Path(root) / "info.json").is_file()):
        raise UserError(f"data.root={root} has no _info.json; {layout}.")
    try:
        reader = ShardReader(root=root, name=name, split=split, is_training=training, batch_size=batch_size,
                             class_map=class_map)
    except KeyError:
        raise UserError(f"data.root={root}: _info.json has no split '{split}'; {layout}.") from None
    ds = IterableImageDataset(root, reader=reader, split=split, is_training=training, batch_size=batch_size)
    classes = ([c for c, _ in sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])] if class_map
               else reader.info.get("classes"))
    if classes is None and num_classes is None:
        raise UserError(f"data.name={name}: the shards' _info.json lists no classes; set data.num_classes "
                        "or add a \"classes\" list of names to _info.json.")
    ds.classes = list(classes) if classes is not None else [str(c) for c in range(num_classes)]
    ds.channels = 3
    return ds


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


SAMPLED_FILES = 8  # images whose bytes go into a folder's, tar's or Hugging Face set's content id
SHARD_ENDS = 1 << 16  # bytes read at each end of a WebDataset shard for its content id


def content_id(ds: Dataset) -> str:
    """What a data set's images and labels are, wherever they lie: a SHA-256 (16 hex digits) that
    a moved ``data.root`` keeps and another copy of the data (resized, relabelled, a different
    release) changes. A resume and a teacher cache compare it (``run.train_data``).

    In memory: every pixel and label. A tar archive: every member's name, size and label, and
    the bytes of :data:`SAMPLED_FILES` evenly spaced members. A folder: every file's name and
    label, and the bytes of as many evenly spaced files (stating a million files would take
    minutes on a network disk). A Hugging Face dataset: its label column and the image bytes of
    as many evenly spaced rows. WebDataset shards: their names, sample counts, sizes and first
    and last :data:`SHARD_ENDS` bytes. Synthetic: its size, classes and seed.
    """
    if isinstance(ds, torch.utils.data.Subset):  # data.holdout: the split underneath
        ds = ds.dataset
    size = ds.reader.split_info.num_samples if isinstance(ds, IterableImageDataset) else len(ds)
    h = hashlib.sha256(f"{type(ds).__name__}|{size}|{getattr(ds, 'classes', None)}\n".encode())
    if isinstance(ds, ArrayDataset):
        h.update(np.ascontiguousarray(ds.images).tobytes())
        h.update(ds.labels.tobytes())
    elif isinstance(ds, SyntheticDataset):
        h.update(f"seed {ds.seed}".encode())
    elif isinstance(ds, IterableImageDataset):
        info = ds.reader.split_info
        for name, count in zip(info.filenames, info.shard_lengths):
            path = Path(ds.reader.root) / name
            size = path.stat().st_size if path.is_file() else None
            h.update(f"{name}|{count}|{size}\n".encode())
            if size:
                with open(path, "rb") as f:
                    h.update(f.read(SHARD_ENDS))
                    f.seek(max(size - SHARD_ENDS, 0))
                    h.update(f.read(SHARD_ENDS))
    elif isinstance(ds, TimmImages):
        _timm_reader_content(ds.reader, h)
    else:
        raise TypeError(f"content_id: no content identity for {type(ds).__name__}")
    return h.hexdigest()[:16]


def _timm_reader_content(reader, h) -> None:
    dataset = getattr(reader, "dataset", None)
    if dataset is not None:  # Hugging Face: its label column (no image decoded)
        if reader.label_key in dataset.column_names:
            h.update(repr(list(dataset[reader.label_key])).encode())
    else:
        targets = getattr(reader, "targets", None)  # the in-tar reader keeps them apart from its samples
        prefix = os.path.join(str(reader.root), "")  # stripped, not os.path.relpath: 0.4 s for ImageNet, not 5
        for i, sample in enumerate(reader.samples):
            item, target = sample[0], (targets[i] if targets is not None else sample[1])
            if isinstance(item, tarfile.TarInfo):
                h.update(f"{item.name}|{item.size}|{target}\n".encode())
            else:
                name = item[len(prefix):] if item.startswith(prefix) else os.path.relpath(item, reader.root)
                h.update(f"{name}|{target}\n".encode())
    n = len(reader)
    for i in sorted({k * (n - 1) // (SAMPLED_FILES - 1) for k in range(SAMPLED_FILES)} if n else ()):
        file = reader[i][0]  # a file, a tar member or a row's bytes
        try:
            h.update(file.read())
        finally:
            file.close()
