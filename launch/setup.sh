#!/usr/bin/env bash
# Set up a virtual environment for the project: `bash launch/setup.sh`, from the repository.
#
# - VENV (default .venv): the environment to create, or to reuse when it exists.
# - torch: reused where the Python that creates the environment already has it (a CUDA build
#   on a GPU machine, say); otherwise the CPU build (about 200 MB, not the multi-GB CUDA one),
#   from a local wheel in TORCH_WHEEL_DIR when there is one, else from PyTorch's CPU index.
# - TORCH_INDEX_URL: install torch from this index instead, e.g. a CUDA build with
#   TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 (pick the CUDA version your driver
#   supports: https://pytorch.org/get-started/locally/); it replaces a CPU build already in VENV.
#   On a machine with NVIDIA GPUs (nvidia-smi) that ends up with a CPU build, setup says so.
# - EXTRAS (default dev,report,predict,wandb,tensorboard: all but onnx): the project's optional
#   extras (dev: pytest, pytest-xdist and ruff; report: plots; predict: reading your own images;
#   wandb: Weights & Biases; tensorboard: TensorBoard event files; onnx: ONNX export; all: every
#   extra but dev, e.g. EXTRAS=all,dev).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${VENV:-.venv}"
EXTRAS="${EXTRAS:-dev,report,predict,wandb,tensorboard}"
TORCH_WHEEL_DIR="${TORCH_WHEEL_DIR:-/opt/wheels}"
TORCH_INDEX_URL="${TORCH_INDEX_URL:-}"

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

has_cuda_build() { "$py" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; }

if [ -n "$TORCH_INDEX_URL" ]; then
  # A CPU build already there is replaced: pip would take it for the torch asked for.
  if ! "$py" -c 'import torch' 2>/dev/null || { ! has_cuda_build && [[ "$TORCH_INDEX_URL" != */cpu ]]; }; then
    "$py" -m pip uninstall -q -y torch 2>/dev/null || true
    echo "setup: installing torch from $TORCH_INDEX_URL"
    "$py" -m pip install -q --index-url "$TORCH_INDEX_URL" torch
  fi
elif ! "$py" -c 'import torch' 2>/dev/null; then
  wheel=$(ls "$TORCH_WHEEL_DIR"/torch-*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then
    # Pinned to the wheel's version, so that a newer (CUDA) torch on PyPI is not preferred.
    version=$(basename "$wheel" | cut -d- -f2 | cut -d+ -f1)
    echo "setup: installing torch $version (CPU build) from $TORCH_WHEEL_DIR"
    "$py" -m pip install -q --find-links "$TORCH_WHEEL_DIR" "torch==$version"
  else
    echo "setup: installing torch (CPU build) from https://download.pytorch.org/whl/cpu"
    "$py" -m pip install -q --index-url https://download.pytorch.org/whl/cpu torch
  fi
fi

echo "setup: installing lenet-ddp with extras [$EXTRAS]"
"$py" -m pip install -q -e ".[$EXTRAS]"
build=$("$py" -c 'import torch; print(torch.__version__, f"(CUDA {torch.version.cuda})" if torch.version.cuda else "(CPU build)")')
echo "setup: done; torch $build in $VENV"
if command -v nvidia-smi >/dev/null 2>&1 && ! has_cuda_build; then
  driver=$(nvidia-smi 2>/dev/null | grep -o 'CUDA Version: [0-9.]*' | head -n 1 || true)
  echo "setup: note: nvidia-smi finds NVIDIA GPUs here${driver:+ (driver: $driver)}, but torch in $VENV is a CPU build: runs will train on CPU" >&2
  echo "setup: for a CUDA build: TORCH_INDEX_URL=https://download.pytorch.org/whl/cuXYZ bash launch/setup.sh, or $py -m pip install --index-url https://download.pytorch.org/whl/cuXYZ torch (cuXYZ: a CUDA version the driver supports, e.g. cu128; see https://pytorch.org/get-started/locally/)" >&2
fi
