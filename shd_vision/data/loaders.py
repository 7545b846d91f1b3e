"""Transforms (timm), samplers and loaders, and the batches' device-side end (normalisation
and erasing of uint8 images, mixup, label smoothing).

Augmentation is a pure function of ``(seed, epoch, position in the epoch)``: the train sampler
hands each item its own seed, and the dataset seeds the RNGs from it before transforming. A run
resumed in the middle of an epoch, or run on another number of workers or processes, therefore
sees the same augmented images as an uninterrupted one. Mixup/CutMix of a batch is likewise a
function of ``(seed, epoch, batch, rank)``, so the teacher cache can replay every mixed batch.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import random
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from omegaconf import DictConfig
from timm.data import Mixup, create_transform, resolve_input_data_config
from timm.data.distributed_sampler import RepeatAugSampler
from timm.data.mixup import mixup_target
from timm.data.random_erasing import RandomErasing
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, IterableDataset, Sampler, Subset
from torchvision import transforms as T

from shd_vision.data import affine, datasets
from shd_vision.errors import UnreadableImage, UserError, unreadable_message

log = logging.getLogger("shd_vision.data")


def open_split(cfg: DictConfig, split: str) -> Dataset:
    """One split of the data set ``cfg`` names, without transforms (they depend on the model)."""
    timm_reader = cfg.name == "imagefolder" or cfg.name.startswith(("hfds/", "wds/"))
    class_map = cfg.get("class_map")
    if class_map and not timm_reader:
        raise UserError(f"data.class_map={class_map} orders the classes of timm's readers (data=imagefolder, "
                        f"hfds or wds); data.name={cfg.name} has a fixed class order, remove it.")
    if class_map and not (Path(class_map).is_file() or (cfg.root and (Path(cfg.root) / class_map).is_file())):
        raise UserError(f"data.class_map={class_map} is not a file (nor one in data.root); give timm's class "
                        "map: a text file with one class folder name per line, in the teacher's order.")
    if cfg.name == "fashion_mnist":
        return datasets.fashion_mnist(cfg.root, split)
    if cfg.name == "digits":
        return datasets.digits(split)
    if cfg.name == "imagefolder":
        if not cfg.root:
            raise UserError("data.root is not set; point it at a folder in the ImageNet layout: "
                            "data.root/train/<class>/<images> and data.root/val/<class>/<images>.")
        return datasets.image_folder(cfg.root, split, class_map)
    if cfg.name.startswith("hfds/"):
        return datasets.hf_dataset(cfg.name, cfg.root, split, class_map, cfg.num_classes)
    if cfg.name.startswith("wds/"):
        return datasets.webdataset(cfg.name, cfg.root, split, split == cfg.train_split, cfg.batch_size,
                                   cfg.num_classes, class_map)
    if cfg.name != "synthetic":
        raise UserError(f"data.name={cfg.name} is not a data set shd-vision reads; use fashion_mnist, digits, "
                        "synthetic, imagefolder (a folder or tar archives per split), hfds/<Hugging Face "
                        "dataset> or wds/<name> (WebDataset shards in data.root).")
    if not (cfg.num_classes and cfg.train_size and cfg.val_size):
        raise UserError("data=synthetic needs data.num_classes, data.train_size and data.val_size.")
    size = cfg.train_size if split == cfg.train_split else cfg.val_size
    return datasets.SyntheticDataset(size, cfg.num_classes, seed=0 if split == cfg.train_split else 1)


def open_splits(cfg: DictConfig) -> Tuple[Dataset, Dataset, List[str]]:
    """The train and validation sets (without transforms) and the class names.

    With ``data.holdout=K`` the validation set is the last ``K`` training images of the fixed
    permutation that ``data.train_size`` takes its first images from, so hyperparameters can be
    tuned on images that are neither trained on nor reported, while the training images stay
    exactly those of a run without a holdout.
    """
    train = open_split(cfg, cfg.train_split)
    if cfg.holdout:
        splits = _carve(cfg, train, open_split(cfg, cfg.train_split))
        _check_class_count(cfg, splits[2])
        return splits
    val = open_split(cfg, cfg.val_split)
    if getattr(train, "numbered", False) and getattr(val, "numbered", False):  # the larger label range names both
        train.classes = val.classes = max(train.classes, val.classes, key=len)
    if train.classes != val.classes:
        raise UserError(f"data.root={cfg.root}: the {cfg.train_split} and {cfg.val_split} splits have "
                        "different classes; both need the same class folders.")
    classes = list(train.classes)
    _check_class_count(cfg, classes)
    return train, val, classes


def _check_class_count(cfg: DictConfig, classes: List[str]) -> None:
    if cfg.num_classes is not None and cfg.num_classes != len(classes):
        raise UserError(f"data.num_classes={cfg.num_classes} but the data has {len(classes)} classes; "
                        "set data.num_classes=null to take the count from the data.")


def content_ids(cfg: DictConfig, splits: Tuple[Dataset, Dataset, List[str]]) -> Tuple[str, str]:
    """The train and validation sets' :func:`~shd_vision.data.datasets.content_id`; held-out
    images (``data.holdout``) are the training split's, hashed once."""
    train = datasets.content_id(splits[0])
    return train, train if cfg.holdout else datasets.content_id(splits[1])


def _carve(cfg: DictConfig, train: Dataset, copy: Dataset) -> Tuple[Dataset, Dataset, List[str]]:
    """``data.holdout``: the training subset and the held-out images (from ``copy``, a second
    instance of the training split, so the two can carry different transforms)."""
    n, keep = len(train), cfg.train_size or len(train) - cfg.holdout
    if keep + cfg.holdout > n:
        raise UserError(f"data.holdout={cfg.holdout} with data.train_size={cfg.train_size} needs "
                        f"{keep + cfg.holdout} training images; the {cfg.train_split} split has {n}. "
                        "Lower one of them (train_size + holdout must not exceed the split).")
    order = _permutation(n)
    return (Subset(train, sorted(order[:keep].tolist())), Subset(copy, sorted(order[n - cfg.holdout:].tolist())),
            list(train.classes))


def resolve_input(cfg: DictConfig, model: nn.Module) -> Dict[str, Any]:
    """The input pipeline for ``model``: its (C, H, W), and the data config's normalisation,
    image size and interpolation where set, else the model's (timm's resolution rules)."""
    wanted = {"mean": cfg.mean, "std": cfg.std, "img_size": cfg.img_size,
              "interpolation": cfg.aug.interpolation, "crop_pct": cfg.aug.crop_pct}
    args = {k: (tuple(v) if k in ("mean", "std") else v) for k, v in wanted.items() if v is not None}
    try:
        resolved = resolve_input_data_config(model, args=args)
    except ValueError as e:
        raise UserError(f"the data config does not fit the student: {e} Set data.img_size=null to use "
                        "the student's size, or give the student that size (model.img_size=...).") from None
    return {k: resolved[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")}


def build_transform(cfg: DictConfig, data_cfg: Dict[str, Any], channels_in: int, training: bool):
    """timm's train or eval transform, after turning the images into the model's channel count.
    With ``data.normalize_on_device`` the train transform ends in uint8 tensors (timm's prefetcher
    form) and :class:`BatchFinish` normalises and erases them; ``data.aug.affine=opencv`` warps
    RandAugment's geometric ops with OpenCV (:mod:`shd_vision.data.affine`)."""
    c = data_cfg["input_size"][0]
    common = dict(input_size=data_cfg["input_size"], mean=data_cfg["mean"], std=data_cfg["std"],
                  interpolation=data_cfg["interpolation"], crop_pct=data_cfg["crop_pct"])
    if training:
        aug = cfg.aug
        tf = create_transform(is_training=True, scale=tuple(aug.scale), ratio=tuple(aug.ratio),
                              hflip=aug.hflip, vflip=aug.vflip, color_jitter=aug.color_jitter,
                              auto_augment=aug.auto_augment, re_prob=aug.re_prob,
                              re_mode=aug.re_mode, re_count=aug.re_count,
                              use_prefetcher=bool(cfg.get("normalize_on_device")), **common)
        if aug.get("affine") == "opencv":
            affine.use_opencv(tf)
    else:
        tf = create_transform(is_training=False, **common)
    if channels_in != c:
        tf = T.Compose([T.Grayscale(num_output_channels=c), tf])
    return tf


def _permutation(n: int) -> torch.Tensor:
    """The fixed order subsets are taken in (seed 0, whatever the run's seed, so runs with
    different seeds compare on the same images)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(0))


def _subset(ds: Dataset, size: Optional[int], key: str) -> Dataset:
    """The first ``size`` items of the fixed permutation; a size beyond the split is capped, saying so."""
    if size is not None and size > len(ds):
        log.warning("%s=%d is more than the %d images of the split: it uses all %d", key, size, len(ds), len(ds))
    if size is None or size >= len(ds):
        return ds
    return Subset(ds, sorted(_permutation(len(ds))[:size].tolist()))


class SkipBadImages(Dataset):
    """``data.skip_bad_images=true``: item ``i`` whose file is unreadable becomes the next readable
    item (``i+1``, ``i+2``, ... wrapping around), the same one in every run, so that a resumed run
    stays bit-identical. Each bad file is logged once per process and appended to ``record``."""

    def __init__(self, dataset: Dataset, record: Optional[Path]):
        self.dataset, self.record, self.seen = dataset, record, set()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        for k in range(len(self.dataset)):
            try:
                return self.dataset[(index + k) % len(self.dataset)]
            except UnreadableImage as e:
                self._note(unreadable_message(e))
        raise UserError("no image of the data set could be read (data.skip_bad_images=true replaced "
                        "every one); check data.root.")

    def _note(self, message: str) -> None:
        if message in self.seen:
            return
        self.seen.add(message)
        log.warning("skipped an %s; the next readable image stands in for it (data.skip_bad_images=true)", message)
        if self.record is not None:
            with open(self.record, "a") as f:
                f.write(message + "\n")


def random_labels(ds: Dataset) -> bool:
    """Whether a split's labels are random (the synthetic set), so no model can beat chance on it."""
    while isinstance(ds, Subset):
        ds = ds.dataset
    return isinstance(ds, datasets.SyntheticDataset)


def bad_images(record: Path) -> List[str]:
    """The distinct unreadable files a run skipped, from every process's notes in ``record``."""
    return sorted(set(record.read_text().splitlines())) if record.is_file() else []


def _guard(ds: Dataset, cfg: DictConfig, record: Optional[Path]) -> Dataset:
    return SkipBadImages(ds, record) if cfg.get("skip_bad_images") else ds


def sample_seed(seed: int, epoch: int, position: int) -> int:
    """The augmentation seed of the item at global ``position`` of ``epoch``."""
    return int(np.random.SeedSequence([seed, epoch, position]).generate_state(1)[0])


def batch_seed(seed: int, epoch: int, batch: int, rank: int) -> int:
    """The mixup seed of ``rank``'s ``batch``-th batch of ``epoch`` (a longer key than an item's
    seed, so the two streams never coincide)."""
    return int(np.random.SeedSequence([seed, epoch, batch, rank, 0]).generate_state(1)[0])


class SeededItems(Dataset):
    """Fetches ``(index, seed)`` items: seeds Python's, NumPy's and torch's CPU RNGs, then
    transforms. (``torch.manual_seed`` would also seed every CUDA device, at ~2 ms a call.)"""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        index, seed = item
        random.seed(seed)
        np.random.seed(seed)
        torch.default_generator.manual_seed(seed)
        return self.dataset[index]


class EpochSampler(Sampler):
    """One rank's share of an epoch as ``(index, seed)`` items, optionally starting part-way.

    Wraps a sampler with ``set_epoch`` (``DistributedSampler`` or timm's ``RepeatAugSampler``).
    Item ``p`` of rank ``r`` sits at global position ``p * world + r``, the position it would
    have in a single-process run with the same global batch.
    """

    def __init__(self, base: Sampler, seed: int, rank: int, world: int):
        self.base, self.seed, self.rank, self.world = base, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select ``epoch``'s order and skip its first ``start`` items (a resumed epoch)."""
        self.epoch, self.start = epoch, start
        # RepeatAugSampler shuffles by epoch alone, so the run's seed goes in as an offset (ours).
        offset = self.seed * 100_003 if isinstance(self.base, RepeatAugSampler) else 0
        self.base.set_epoch(epoch + offset)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        for p, index in enumerate(itertools.islice(iter(self.base), self.start, None), self.start):
            yield index, sample_seed(self.seed, self.epoch, p * self.world + self.rank)

    def __len__(self) -> int:
        return len(self.base) - self.start


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, without padding, so sharded metrics count each
    validation image exactly once."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = range(rank, length, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class BatchFinish:
    """The end of one rank's training batch ``(epoch, batch)``, on the training device.

    With ``data.normalize_on_device`` the loader workers ship uint8 images (a quarter of
    float32's bytes, and no per-image float conversion) and normalisation and random erasing run
    here, as in timm's prefetcher. Then the targets: timm's Mixup/CutMix, or smoothed one-hot
    labels, or the labels themselves (``F.cross_entropy`` takes all three). Erasing and mixup draw
    from RNGs seeded by :func:`batch_seed` and then restored, so a batch is a function of
    ``(seed, epoch, batch, rank)`` and the teacher cache can replay it.
    """

    def __init__(self, cfg: DictConfig, data_cfg: Dict[str, Any], num_classes: int, seed: int, rank: int):
        m, aug = cfg.mixup, cfg.aug
        self.mixup = None
        if m.mixup_alpha > 0 or m.cutmix_alpha > 0:
            if cfg.batch_size % 2:
                raise UserError(f"data.batch_size={cfg.batch_size} must be even for mixup/cutmix.")
            self.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                               switch_prob=m.switch_prob, mode=m.mode,
                               label_smoothing=m.label_smoothing, num_classes=num_classes)
        self.smoothing, self.num_classes = m.label_smoothing, num_classes
        self.seed, self.rank = seed, rank
        self.on_device = bool(cfg.get("normalize_on_device"))
        # uint8 in [0, 255] to the float images timm's Normalize makes of them
        self.mean = torch.tensor(data_cfg["mean"]).view(-1, 1, 1) * 255
        self.std = torch.tensor(data_cfg["std"]).view(-1, 1, 1) * 255
        self.erase = (RandomErasing(aug.re_prob, mode=aug.re_mode, max_count=aug.re_count, device="cpu")
                      if self.on_device and aug.re_prob > 0 else None)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, batch: int
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
        """The images (normalised, erased, mixed) and targets of this rank's ``batch``-th batch of ``epoch``."""
        if self.mixup is None and self.smoothing == 0 and not self.on_device:
            return images, labels
        devices = [images.device] if images.device.type == "cuda" else []
        with isolated_rng(), torch.random.fork_rng(devices=devices):
            s = batch_seed(self.seed, epoch, batch, self.rank)
            random.seed(s)
            np.random.seed(s)
            torch.default_generator.manual_seed(s)
            if devices:
                torch.cuda.manual_seed(s)  # the current device's generator only: random erasing's noise
            if images.dtype == torch.uint8:
                images = self.normalize(images)
            if self.mixup is not None:
                return self.mixup(images, labels)
        if self.smoothing > 0:
            return images, mixup_target(labels, self.num_classes, 1.0, self.smoothing)
        return images, labels

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``[B, C, H, W]`` to normalised float32, then random erasing (timm's, per image)."""
        mean, std = self.mean.to(images.device), self.std.to(images.device)
        images = (images.float() - mean) / std
        if self.erase is not None:
            self.erase.device = images.device
            images = self.erase(images)
        return images


@dataclass
class Data:
    """Everything the engine needs from the data side."""

    train: DataLoader
    val: DataLoader
    sampler: Union[EpochSampler, "StreamEpochs"]
    finish: BatchFinish  # normalise/erase (data.normalize_on_device), mixup, targets
    classes: List[str]
    input: Dict[str, Any]  # input_size, mean, std, interpolation, crop_pct (saved in checkpoints)
    train_images: int  # an epoch's training images, over all processes
    val_images: int  # the validation images, over all processes (each counted once)
    stream_workers: Optional[int] = None  # a stream's processes x loader workers, which shape its epochs

    def epoch(self, epoch: int, done: int) -> Iterator[Any]:
        """The training batches of ``epoch`` after the first ``done`` (a resumed epoch)."""
        self.sampler.set_epoch(epoch, start=done * self.train.batch_size)
        it = batches(self.train)
        return itertools.islice(it, self.sampler.skip, None) if isinstance(self.sampler, StreamEpochs) else it


def _prepare(ds: Dataset, cfg: DictConfig, data_cfg: Dict[str, Any], training: bool) -> None:
    """Give a data set the model's input pipeline: a transform, or the synthetic images' size."""
    if isinstance(ds, Subset):  # data.holdout: the transform belongs to the images underneath
        ds = ds.dataset
    if isinstance(ds, datasets.SyntheticDataset):
        ds.input_size = tuple(data_cfg["input_size"])
    else:
        ds.transform = build_transform(cfg, data_cfg, ds.channels, training)


def _stream_options(cfg: DictConfig) -> None:
    """Map-style options an iterable reader (WebDataset) cannot honour are refused, not ignored;
    ``data.train_size`` caps its epochs instead (:func:`_plan_stream_epoch`)."""
    given = [f"data.{k}={cfg[k]}" for k in ("holdout", "repeated_aug", "skip_bad_images") if cfg[k]]
    if given:
        raise UserError(f"{', '.join(given)}: WebDataset shards are read as a stream, which has no "
                        "held-out split, repeated augmentation or stand-in images; remove them.")
    if cfg.num_workers < 1:
        raise UserError("data.num_workers=0: WebDataset shards are shuffled and augmented inside loader "
                        "workers, whose seeds make an epoch reproducible; set data.num_workers=1 or more.")
    if cfg.val_size:
        log.warning("data.val_size=%d is not applied to WebDataset shards: the whole %s split is "
                    "evaluated", cfg.val_size, cfg.val_split)


def build_val_loader(cfg: DictConfig, val: Dataset, data_cfg: Dict[str, Any],
                     rank: int = 0, world: int = 1, bad_record: Optional[Path] = None) -> DataLoader:
    _prepare(val, cfg, data_cfg, training=False)
    if isinstance(val, IterableDataset):  # timm gives each process and worker its own shards
        _stream_options(cfg)
        val.set_loader_cfg(num_workers=cfg.num_workers)
        return DataLoader(val, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                          num_workers=cfg.num_workers, pin_memory=_pin(cfg), generator=_own_generator(),
                          worker_init_fn=_leave_ctrl_c_to_the_run)
    val = _guard(_subset(val, cfg.val_size, "data.val_size"), cfg, bad_record)
    return DataLoader(val, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                      sampler=ShardSampler(len(val), rank, world), num_workers=cfg.num_workers,
                      pin_memory=_pin(cfg), generator=_own_generator(),
                      worker_init_fn=_leave_ctrl_c_to_the_run)


def _pin(cfg: DictConfig) -> bool:
    """``data.pin_memory`` where there is a GPU to copy to (PyTorch warns on every CPU-only run)."""
    return cfg.pin_memory and torch.cuda.is_available()


def _leave_ctrl_c_to_the_run(worker_id: int) -> None:
    """A terminal's Ctrl-C reaches the loader workers too; PyTorch's workers end on it, and the run,
    which stops at its next step with a checkpoint (engine/guards.py), would find them gone. They
    ignore it: the loader's shutdown ends them by its own events."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _own_generator() -> torch.Generator:
    """A loader's private generator: starting an iterator then leaves the global RNG alone, which
    a resumed run needs to stay bit-identical to an uninterrupted one."""
    return torch.Generator().manual_seed(0)


def build_data(cfg: DictConfig, splits: Tuple[Dataset, Dataset, Sequence[str]], data_cfg: Dict[str, Any],
               seed: int, rank: int = 0, world: int = 1, bad_record: Optional[Path] = None) -> Data:
    """Loaders for one process of a ``world``-process run (``data.batch_size`` is per process);
    ``bad_record`` collects the unreadable files ``data.skip_bad_images=true`` skips."""
    train, val, classes = splits
    _prepare(train, cfg, data_cfg, training=True)
    if isinstance(train, IterableDataset):
        return _stream_data(cfg, train, val, classes, data_cfg, seed, rank, world)
    train = _guard(_subset(train, cfg.train_size, "data.train_size"), cfg, bad_record)
    if cfg.repeated_aug > 1:
        base = RepeatAugSampler(train, num_replicas=world, rank=rank, num_repeats=cfg.repeated_aug)
    else:
        base = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed,
                                  drop_last=True)
    sampler = EpochSampler(base, seed, rank, world)
    if len(sampler) < cfg.batch_size:
        raise UserError(f"data.batch_size={cfg.batch_size} is larger than this process's share of "
                        f"the training set ({len(sampler)} images); lower it or use more data.")
    train_loader = DataLoader(SeededItems(train), batch_size=cfg.batch_size, sampler=sampler,
                              num_workers=cfg.num_workers, pin_memory=_pin(cfg), drop_last=True,
                              generator=_own_generator(),
                              worker_init_fn=_leave_ctrl_c_to_the_run)
    val_loader = build_val_loader(cfg, val, data_cfg, rank, world, bad_record)
    return Data(train_loader, val_loader, sampler, BatchFinish(cfg, data_cfg, len(classes), seed, rank), list(classes),
                data_cfg, len(train), len(val_loader.dataset))


class StreamEpochs:
    """The epochs of an iterable reader (timm's WebDataset reader), in the place of a sampler.

    timm orders the shards of epoch ``e`` by ``(seed, e)``; the loader's generator is reseeded
    from ``(seed, e, rank)`` before each epoch, so that every worker's sample shuffle and
    augmentations, and hence the epoch's batches, are a function of them. A resumed epoch replays
    its stream and drops the batches already trained on (decoded, not trained).
    """

    def __init__(self, loader: DataLoader, seed: int, rank: int):
        self.loader, self.seed, self.rank = loader, seed, rank
        self.skip = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.loader.dataset.set_epoch(epoch)
        self.loader.generator.manual_seed(sample_seed(self.seed, epoch, self.rank))
        self.skip = start // self.loader.batch_size


def _stream_data(cfg: DictConfig, train: IterableDataset, val: Dataset, classes: Sequence[str],
                 data_cfg: Dict[str, Any], seed: int, rank: int, world: int) -> Data:
    _stream_options(cfg)
    train.reader.common_seed = seed  # timm's shard order follows the run's seed, not its default 42
    train.set_loader_cfg(num_workers=cfg.num_workers)
    _plan_stream_epoch(cfg, train.reader, world)
    loader = DataLoader(train, batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=_pin(cfg),
                        drop_last=True, generator=_own_generator(),
                        worker_init_fn=_leave_ctrl_c_to_the_run)
    val_loader = build_val_loader(cfg, val, data_cfg, rank, world)
    return Data(loader, val_loader, StreamEpochs(loader, seed, rank), BatchFinish(cfg, data_cfg, len(classes), seed, rank),
                list(classes), data_cfg, train.reader.per_worker * world * cfg.num_workers,
                val.reader.split_info.num_samples, world * cfg.num_workers)


def _plan_stream_epoch(cfg: DictConfig, reader: datasets.ShardReader, world: int) -> None:
    """A training epoch of a stream in which no sample comes twice.

    Each of the ``world x data.num_workers`` loader workers streams whole shards (a new draw of
    them every epoch) and the same number of samples, so the epoch takes from each worker as many
    whole batches as the worker with the fewest samples holds, within ``data.train_size``.
    """
    workers, lengths = world * cfg.num_workers, sorted(reader.split_info.shard_lengths)
    total = reader.split_info.num_samples
    if len(lengths) < workers:
        raise UserError(
            f"data.root={cfg.root}: the {cfg.train_split} split has {len(lengths)} shard(s), fewer than the "
            f"{workers} loader workers that read whole shards ({world} process(es) x data.num_workers="
            f"{cfg.num_workers}), so some would have none. Write at least {workers} shards (of equal size, "
            "a multiple of processes x workers, every sample is used each epoch) or lower data.num_workers.")
    wanted = total
    if cfg.train_size is not None and cfg.train_size > total:
        log.warning("data.train_size=%d is more than the %d samples of the %s split: it uses all %d",
                    cfg.train_size, total, cfg.train_split, total)
    elif cfg.train_size is not None:
        wanted = cfg.train_size
    fewest = sum(lengths[:len(lengths) // workers])  # what the unluckiest worker's draw of shards holds
    reader.per_worker = min(fewest, wanted // workers) // cfg.batch_size * cfg.batch_size
    if reader.per_worker == 0:
        raise UserError(f"data.batch_size={cfg.batch_size} is larger than a loader worker's share of the "
                        f"{cfg.train_split} shards ({min(fewest, wanted // workers)} samples over {workers} "
                        "workers); lower it or data.num_workers, or write more samples.")
    epoch = reader.per_worker * workers
    if epoch < wanted:
        log.warning("an epoch of the %s stream trains on %d of its %d samples (%d whole batches per loader "
                    "worker, each worker streaming whole shards); equal shards, a multiple of processes x "
                    "workers in number and size, use them all", cfg.train_split, epoch, wanted,
                    reader.per_worker // cfg.batch_size)


@contextlib.contextmanager
def isolated_rng():
    """Run a block without touching the global RNG states (Python, NumPy, torch CPU).

    Loading batches in the main process (``num_workers=0``) seeds the RNGs per item; this keeps
    that from leaking into the training step's randomness (dropout, mixup).
    """
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def batches(loader: DataLoader) -> Iterator[Any]:
    """Iterate a train loader; in-process loading runs under :func:`isolated_rng`."""
    if loader.num_workers > 0:
        yield from loader
        return
    it = iter(loader)
    while True:
        with isolated_rng():
            batch = next(it, None)
        if batch is None:
            return
        yield batch
