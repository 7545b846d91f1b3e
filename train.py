"""Distil a student from a teacher: ``python train.py model=deit_tiny teacher=deit_small kd=shd
data=imagenet data.root=/data/imagenet``. Every option is a Hydra override (``--help``, ``--cfg job``)."""

import logging

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from shd_vision import cli


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float:
    """Returns the final validation top-1, the value Hydra sweepers (Optuna) maximise."""
    summary, _ = cli.run_task(_train, cfg)
    hydra_cfg = HydraConfig.get()
    if (summary.get("status") == "stopped" and hydra_cfg.mode == RunMode.MULTIRUN
            and hydra_cfg.launcher._target_.endswith("BasicLauncher")):
        # this process runs the sweep's remaining jobs: a stop signal ends them too
        from shd_vision.engine.identity import continue_command

        logging.getLogger("shd_vision").warning(
            "the sweep stops here (%s); the rest of its jobs did not run. Continue it (unfinished jobs "
            "resume, finished ones are skipped) with:\n%s", summary["reason"], continue_command(cfg.run_name))
        raise SystemExit(143)
    return summary["top1"]


def _train(cfg: DictConfig):
    from shd_vision.engine.train import train  # torch and timm once the config has passed its checks

    return train(cfg)


if __name__ == "__main__":
    cli.main(main)
