"""One process of a test launch: ``torchrun ... tests/ddp_worker.py OUT_DIR OVERRIDES...``.

Runs ``train`` on the composed config and saves this rank's final student weights as
``OUT_DIR/rank<r>.pt``, so a test can compare the ranks of one run and runs with each other.
"""

import os
import sys
from pathlib import Path

import torch

from shd_vision.config import compose_train
from shd_vision.engine.train import train

if __name__ == "__main__":
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    summary, objects = train(compose_train(overrides))
    torch.save(objects["student"].state_dict(), out / f"rank{os.environ.get('RANK', '0')}.pt")
