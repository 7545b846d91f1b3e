"""Distil a student from a teacher: ``python train.py model=deit_tiny teacher=deit_small kd=shd
data=imagenet data.root=/data/imagenet``. Every option is a Hydra override (``--help``, ``--cfg job``)."""

import hydra
from omegaconf import DictConfig

from shd_vision import cli
from shd_vision.engine.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the final validation top-1, the value Hydra sweepers (Optuna) maximise."""
    summary, _ = cli.run_task(train, cfg)
    return summary["top1"]


if __name__ == "__main__":
    cli.main(main)
