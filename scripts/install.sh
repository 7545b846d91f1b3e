#!/usr/bin/env bash
# Install shd-vision into ./.venv, plus Debian's Fashion-MNIST files when they are missing.
# Idempotent: a second call only checks. Usage: bash scripts/install.sh [--dev]
set -euo pipefail
cd "$(dirname "$0")/.."

FMNIST=/usr/share/datasets/fashion-mnist
if [ ! -f "$FMNIST/train-images-idx3-ubyte.gz" ]; then
  if [ "$(id -u)" = 0 ]; then SUDO=""; elif command -v sudo >/dev/null; then SUDO=sudo; else SUDO=missing; fi
  if [ "$SUDO" = missing ] || ! command -v apt-get >/dev/null; then
    echo "install.sh: Fashion-MNIST is not in $FMNIST and this machine cannot apt-get it;" \
         "install Debian's dataset-fashion-mnist package or pass data.root=DIR to the runs." >&2
  else
    echo "install.sh: installing Debian's dataset-fashion-mnist into $FMNIST"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  echo "install.sh: creating .venv"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
fi
extras=""
[ "${1:-}" = "--dev" ] && extras="[dev]"
# torch and torchvision are pinned to the releases pip finds on local disk here (pyproject.toml).
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".${extras}" 2>&1 | grep -v "is ignored: it is neither" || true
.venv/bin/python -c "import shd_vision, torch, timm, hydra" \
  || { echo "install.sh: the environment in .venv is broken; delete .venv and run again" >&2; exit 1; }
