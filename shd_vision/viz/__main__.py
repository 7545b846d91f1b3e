"""``python -m shd_vision.viz ckpt=PATH``: the attention pictures of a distilled student (see
``shd_vision/viz/attention.py``), written to ``logs/viz/runs/<time>/``."""

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from shd_vision import cli
from shd_vision.config import check_config
from shd_vision.engine.runtime import resolve_device
from shd_vision.viz.attention import render

log = logging.getLogger("shd_vision.viz")


def pictures(cfg: DictConfig) -> list:
    check_config(cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    files = render(cfg, out_dir, resolve_device(cfg.device))
    log.info("attention pictures of %s:\n  %s", cfg.ckpt, "\n  ".join(str(f) for f in files))
    return files


@hydra.main(version_base="1.3", config_path="../../conf", config_name="viz")
def main(cfg: DictConfig) -> None:
    cli.run_task(pictures, cfg)


if __name__ == "__main__":
    cli.main(main)
