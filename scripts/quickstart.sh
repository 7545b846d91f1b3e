#!/usr/bin/env bash
# README command 1: install, then run the whole embedded-default flow (teacher, students, comparison).
# Extra arguments are train.py overrides applied to every run, e.g. debug=fast or trainer.device=cpu.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m shd_vision.quickstart "$@"
