#!/usr/bin/env bash
# Wheels for scripts/gpu_check.sh on a GPU machine without network, into .whl/ (git-ignored; it
# travels with the working tree). Run here, where pip reaches PyPI:
#
#     bash scripts/gpu_wheels.sh          # for the GPU machine's Python 3.12
#     bash scripts/gpu_wheels.sh 3.11
#
# What a machine that already has torch, timm, lightning, tensorboard, safetensors and matplotlib
# lacks, at the versions this checkout's .venv runs (PyPI's newest where the venv has none). All
# are pure Python: one wheel serves any platform.
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-.venv/bin/python}
target=${1:-3.12}
packages=(jsonargparse docstring-parser typeshed-client webdataset braceexpand
          segmentation-models-pytorch torchmetrics lightning-utilities)
mkdir -p .whl
for name in "${packages[@]}"; do
    version=$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name" 2>/dev/null || true)
    "$py" -m pip download -q --no-deps --only-binary=:all: --python-version "$target" --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$name${version:+==$version}"
done
ls .whl
