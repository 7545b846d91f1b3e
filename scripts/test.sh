#!/usr/bin/env bash
# README command 2 (and CI's): install with test extras, then run the whole test suite.
# Extra arguments go to pytest, e.g. -m "not slow" for the quick subset. The tests run in one
# pytest-xdist worker per core, each test file on one worker (its module fixtures are built once).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
exec .venv/bin/python -m pytest -n auto --dist loadfile "$@"
