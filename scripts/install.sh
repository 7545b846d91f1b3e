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
pip() { .venv/bin/python -m pip -q --disable-pip-version-check "$@" 2>&1 | grep -v "is ignored: it is neither" || true; }
is_simd() { .venv/bin/python -c "import PIL, sys; sys.exit('.post' not in PIL.__version__)" 2>/dev/null; }
# pip runs when pyproject.toml or the options changed since the last install (a stamp in .venv):
# pip would otherwise reinstall stock Pillow over pillow-simd, whose package name it does not know.
want="$(sha1sum pyproject.toml | cut -c1-40) simd=${SHD_PILLOW_SIMD:-1}"
stamp=$(cat .venv/.installed 2>/dev/null || true)
if [ "${stamp% extras=*}" != "$want" ] || { [ -n "$extras" ] && [ "${stamp##* extras=}" != "$extras" ]; }; then
  # torch and torchvision are pinned to the releases pip finds on local disk here (pyproject.toml).
  pip install -e ".${extras}"
  # pillow-simd: Pillow with SIMD resampling (bicubic resizes ~6x faster: docs/performance.md), the
  # loader workers' largest cost after decoding. Built from source once (pip caches the wheel) where
  # a C compiler, libjpeg's and zlib's headers and AVX2 are found; SHD_PILLOW_SIMD=0 keeps stock
  # Pillow. Stock Pillow also goes to .venv/pillow-stock, for benchmarks/loader.py's timm arm.
  stock=$(.venv/bin/python -c "import PIL; print(PIL.__version__)")
  if [ "${SHD_PILLOW_SIMD:-1}" = 1 ] && ! is_simd; then
    if grep -qw avx2 /proc/cpuinfo && command -v cc >/dev/null && [ -f /usr/include/jpeglib.h ] && [ -f /usr/include/zlib.h ]; then
      echo "install.sh: building pillow-simd (once, about two minutes)"
      pip install --target .venv/pillow-stock --no-deps --upgrade "pillow==$stock"
      pip uninstall -y pillow
      CC="cc -mavx2" pip install --no-deps --force-reinstall "pillow-simd==12.1.1.post0"
      is_simd || { echo "install.sh: pillow-simd did not build; keeping stock Pillow $stock" >&2; pip install "pillow==$stock"; }
    else
      echo "install.sh: no AVX2, C compiler or libjpeg/zlib headers (Debian: libjpeg-dev zlib1g-dev): keeping stock Pillow $stock"
    fi
  elif [ "${SHD_PILLOW_SIMD:-1}" != 1 ] && is_simd; then
    pip uninstall -y pillow-simd
    pip install --force-reinstall --no-deps "pillow<13"
  fi
  echo "$want extras=$extras" > .venv/.installed
fi
.venv/bin/python -c "import shd_vision, torch, timm, hydra" \
  || { echo "install.sh: the environment in .venv is broken; delete .venv and run again" >&2; exit 1; }
