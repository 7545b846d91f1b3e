"""``python -m shd_vision.data.check data=imagefolder data.root=DIR``: every unreadable image file
of a data set's train and validation splits, listed before a run meets them.

Each image is decoded in full (a truncated JPEG fails only there), in ``data.num_workers``
processes (all cores when 0), with progress lines; the list goes to the terminal and to
``unreadable.txt`` in the run directory. Exit code 0 when every file reads, 1 when some do not.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from multiprocessing import get_context
from pathlib import Path
from typing import List, Optional, Sequence

import hydra
from omegaconf import DictConfig
from torch.utils.data import Dataset

from shd_vision import cli
from shd_vision.data.loaders import open_split
from shd_vision.engine.logbook import format_duration, run_logging
from shd_vision.errors import UnreadableImage, UserError, unreadable_message

log = logging.getLogger("shd_vision.check")
_dataset: Optional[Dataset] = None  # each worker's copy of the split being scanned


def _problems(indices: Sequence[int]) -> List[str]:
    found = []
    for i in indices:
        try:
            _dataset[i]
        except UnreadableImage as e:
            found.append(unreadable_message(e))
    return found


def _use(dataset: Dataset) -> None:
    global _dataset
    _dataset = dataset


def scan(dataset: Dataset, name: str, processes: int, chunk: int = 256) -> List[str]:
    """The unreadable files of ``dataset``, checked in ``processes`` processes."""
    chunks = [range(start, min(start + chunk, len(dataset))) for start in range(0, len(dataset), chunk)]
    found: List[str] = []
    t0, done, shown = time.perf_counter(), 0, 0.0
    with get_context("fork").Pool(processes, initializer=_use, initargs=(dataset,)) as pool:
        for part, problems in zip(chunks, pool.imap(_problems, chunks)):
            found += problems
            done += len(part)
            elapsed = time.perf_counter() - t0
            if elapsed - shown >= 5 or done == len(dataset):
                shown = elapsed
                rate = done / max(elapsed, 1e-9)
                log.info("%s: %d/%d images | %.0f img/s | eta %s | %d unreadable", name, done, len(dataset),
                         rate, format_duration((len(dataset) - done) / rate), len(found))
    return found


def check(cfg: DictConfig) -> int:
    if cfg.data.name.startswith("wds/"):
        raise UserError(f"data.name={cfg.data.name}: the scanner reads data sets item by item (folders, tar "
                        "archives, Hugging Face datasets); WebDataset shards are streams, and timm's reader "
                        "skips a sample it cannot decode with a warning instead of stopping.")
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with run_logging(out_dir, True, "check.log"):
        processes = cfg.data.num_workers or os.cpu_count() or 1
        found: List[str] = []
        for split in (cfg.data.train_split, cfg.data.val_split):
            found += scan(open_split(cfg.data, split), f"{cfg.data.name}/{split}", processes)
        (out_dir / "unreadable.txt").write_text("".join(f"{line}\n" for line in found))
        if found:
            log.warning("%d unreadable image file(s) (also in %s):\n  %s\nReplace or delete them, or train "
                        "with data.skip_bad_images=true.", len(found), out_dir / "unreadable.txt",
                        "\n  ".join(found))
        else:
            log.info("every image of %s reads (%s)", cfg.data.name, out_dir)
    return 1 if found else 0


@hydra.main(version_base="1.3", config_path="../../conf", config_name="check")
def main(cfg: DictConfig) -> None:
    status = cli.run_task(check, cfg)
    if status:
        sys.exit(status)


if __name__ == "__main__":
    cli.main(main)
