#!/usr/bin/env bash
# Set up a virtual environment for the project: `bash launch/setup.sh`, from the repository.
#
# - VENV (default .venv): the environment to create, or to reuse when it exists.
# - torch: reused where the Python that creates the environment already has it (a CUDA build
#   on a GPU machine, say); otherwise the CPU build (about 200 MB, not the multi-GB CUDA one),
#   from a local wheel in TORCH_WHEEL_DIR when there is one, else from PyTorch's CPU index.
# - EXTRAS (default dev,report,predict,wandb: all of them): the project's optional extras (dev:
#   pytest and ruff; report: plots; predict: reading your own images; wandb: Weights & Biases).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev,report,predict,wandb}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"

if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: $PYTHON is missing or older than 3.10; set PYTHON to a Python 3.10+ interpreter" >&2
  exit 2
fi

if [ ! -x "$VENV/bin/python" ]; then
  if "$PYTHON" -c 'import torch' 2>/dev/null; then
    echo "setup: creating $VENV on top of $PYTHON's packages (its torch is used)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    echo "setup: creating $VENV"
    "$PYTHON" -m venv "$VENV"
  fi
fi
py="$VENV/bin/python"
"$py" -m pip install -q --upgrade pip

if ! "$py" -c 'import torch' 2>/dev/null; then
  wheel=$(ls "$TORCH_WHEEL_DIR"/torch-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then
    # Pinned to the wheel's version, so that a newer (CUDA) torch on PyPI is not preferred.
    version=$(basename "$wheel" | cut -d- -f2 | cut -d+ -f1)
    echo "setup: installing torch $version (CPU) from $TORCH_WHEEL_DIR"
    "$py" -m pip install -q --find-links "$TORCH_WHEEL_DIR" "torch==$version"
  else
    echo "setup: installing torch (CPU build) from https://download.pytorch.org/whl/cpu"
    "$py" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
  fi
fi

echo "setup: installing lenet-ddp with extras [$EXTRAS]"
"$py" -m pip install -q -e ".[$EXTRAS]"
echo "setup: done; torch $("$py" -c 'import torch; print(torch.__version__)') in $VENV"
