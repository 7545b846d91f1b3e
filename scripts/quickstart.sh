#!/usr/bin/env bash
# README command 1: install, then run the whole embedded-default flow (teacher, students, comparison).
# Extra arguments are Hydra overrides for shd_vision.quickstart, e.g. 'overrides=[debug=fast]'.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m shd_vision.quickstart "$@"
