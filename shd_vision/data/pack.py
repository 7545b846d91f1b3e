"""``python -m shd_vision.data.pack data=imagefolder data.root=DIR pack.out=OUT [pack.size=256]``:
a data set's train and validation splits as WebDataset shards of pre-resized JPEGs, for
``data=wds data.root=OUT data.name=wds/<name>``.

FFCV's trick: a loader worker decodes every image in full before cropping it to the model's
size, so an image stored at its training size decodes in a fraction of the time (a 500x375
ImageNet-median JPEG stored with its shorter side at 256 has 47% of the pixels). Images whose
shorter side exceeds ``pack.size`` are resized to it (Pillow's antialiased bicubic) and re-encoded
at ``pack.quality``; smaller JPEGs are stored as they are. This changes the images the crops are
taken from (a small random crop has fewer source pixels), so it is a choice about the data, like
the resolution of a data set: compare a model trained on the shards with one trained on the
originals before relying on it. Samples are shuffled into the shards (a fixed permutation), so
each shard holds every class, as timm's stream reader needs.
"""

from __future__ import annotations

import io
import json
import logging
import os
import sys
import tarfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import hydra
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from shd_vision import cli
from shd_vision.config import check_config
from shd_vision.data.datasets import TimmImages
from shd_vision.data.loaders import open_split
from shd_vision.engine.logbook import format_duration, run_logging
from shd_vision.errors import UNREADABLE, UnreadableImage, UserError, unreadable_message

log = logging.getLogger("shd_vision.pack")
_job: Optional[Tuple[TimmImages, int, int]] = None  # each worker's split, size and quality


def resized_jpeg(file: io.BufferedIOBase, size: int, quality: int) -> bytes:
    """The JPEG bytes of an image with its shorter side at most ``size``: the original bytes if it
    is a JPEG that small already, else resized (antialiased bicubic) and encoded at ``quality``."""
    raw = file.read()
    image = Image.open(io.BytesIO(raw))
    if image.format == "JPEG" and image.mode == "RGB" and min(image.size) <= size:
        return raw
    image = image.convert("RGB")
    w, h = image.size
    if min(w, h) > size:
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC,
                             reducing_gap=3.0)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=quality)
    return out.getvalue()


def _use(dataset: TimmImages, size: int, quality: int) -> None:
    global _job
    _job = (dataset, size, quality)


def _encode(indices: Sequence[int]) -> List[Tuple[int, bytes, int]]:
    dataset, size, quality = _job
    out = []
    for i in indices:
        file, target = dataset.reader[i][:2]
        try:
            out.append((i, resized_jpeg(file, size, quality), int(target)))
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            name = dataset.reader.filename(i, absolute=True) or f"{dataset.where} item {i}"
            raise UnreadableImage(f"{UNREADABLE}{name} ({type(e).__name__}: {e})") from None
        finally:
            file.close()
    return out


def _add(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime = len(payload), 0
    tar.addfile(info, io.BytesIO(payload))


def pack_split(dataset: TimmImages, split: str, out: Path, size: int, quality: int, shard_images: int,
               processes: int) -> dict:
    """Write one split's shards (``<split>-NNNNN.tar``); its ``_info.json`` entry."""
    order = np.random.default_rng(0).permutation(len(dataset)).tolist()
    shards = [order[s:s + shard_images] for s in range(0, len(order), shard_images)]
    names, lengths, done, t0, shown, stored = [], [], 0, time.perf_counter(), 0.0, 0
    with get_context("fork").Pool(processes, initializer=_use, initargs=(dataset, size, quality)) as pool:
        for s, shard in enumerate(shards):
            names.append(f"{split}-{s:05d}.tar")
            partial = out / (names[-1] + ".partial")
            with tarfile.open(partial, "w") as tar:
                chunks = [shard[c:c + 64] for c in range(0, len(shard), 64)]
                for encoded in pool.imap(_encode, chunks):
                    for i, jpeg, target in encoded:
                        _add(tar, f"{i:09d}.jpg", jpeg)
                        _add(tar, f"{i:09d}.cls", str(target).encode())
                        stored += len(jpeg)
            os.replace(partial, out / names[-1])  # a shard is whole or absent
            lengths.append(len(shard))
            done += len(shard)
            elapsed = time.perf_counter() - t0
            if elapsed - shown >= 5 or done == len(order):
                shown, rate = elapsed, done / max(elapsed, 1e-9)
                log.info("%s: %d/%d images, %d shard(s) | %.0f img/s | eta %s | %.0f KB per image", split, done,
                         len(order), len(names), rate, format_duration((len(order) - done) / rate),
                         stored / done / 1e3)
    return {"name": split, "num_samples": len(order), "filenames": names, "shard_lengths": lengths}


def pack(cfg: DictConfig) -> int:
    check_config(cfg)
    p, data = cfg.pack, cfg.data
    if not (data.name == "imagefolder" or data.name.startswith("hfds/")):
        raise UserError(f"data.name={data.name}: pack reads image files, from image folders, tar archives of "
                        "them and Hugging Face datasets (data=imagefolder or data=hfds); WebDataset shards are "
                        "packed already and the built-in sets are arrays of small images.")
    if not p.out:
        raise UserError("pack.out is not set; give the directory the shards go to (it must not hold shards yet).")
    out = Path(p.out)
    if (out / "_info.json").exists():
        raise UserError(f"pack.out={out} holds packed shards already (_info.json); give an empty or new "
                        "directory, or delete that one.")
    out.mkdir(parents=True, exist_ok=True)
    with run_logging(out, True, "pack.log"):
        processes = data.num_workers or os.cpu_count() or 1
        splits, classes = {}, None
        for split in (data.train_split, data.val_split):
            dataset = open_split(data, split)
            classes = classes or list(dataset.classes)
            try:
                splits[split] = pack_split(dataset, split, out, p.size, p.quality, p.shard_images, processes)
            except UnreadableImage as e:
                raise UserError(f"{unreadable_message(e)}: nothing of {split} was listed in {out}/_info.json. "
                                "python -m shd_vision.data.check lists every unreadable file.") from None
        (out / "_info.json").write_text(json.dumps({"classes": classes, "splits": splits}, indent=1))
        log.info("packed %s into %s: %s; train with data=wds data.root=%s data.name=wds/%s "
                 "data.train_split=%s data.val_split=%s", data.name, out,
                 ", ".join(f"{k} {v['num_samples']} images in {len(v['filenames'])} shards" for k, v in splits.items()),
                 out, out.name, data.train_split, data.val_split)
    return 0


@hydra.main(version_base="1.3", config_path="../../conf", config_name="pack")
def main(cfg: DictConfig) -> None:
    status = cli.run_task(pack, cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    cli.main(main)
