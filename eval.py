"""Evaluate a checkpoint: ``python eval.py ckpt=logs/train/runs/<run>/checkpoints/best.pt``.
Top-1/top-5/loss, per-class accuracy, a confusion matrix PNG and throughput (see README)."""

import hydra
from omegaconf import DictConfig

from shd_vision import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> float:
    return cli.run_task(_evaluate, cfg)["top1"]


def _evaluate(cfg: DictConfig):
    from shd_vision.engine.evaluate import evaluate_checkpoint  # torch and timm once the config has passed its checks

    return evaluate_checkpoint(cfg)


if __name__ == "__main__":
    cli.main(main)
