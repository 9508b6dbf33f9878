#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, end to end in under 8 minutes, one JSON of figures
# (scripts/gpu_check.py says what each part measures; docs/install.md how to run it).
#
#     bash scripts/gpu_check.sh                           # -> gpu_check.json
#     bash scripts/gpu_check.sh --json /tmp/figures.json  # arguments go to scripts/gpu_check.py
#     bash scripts/gpu_check.sh --device cpu --quick      # the CPU-runnable parts, to try it here
#
# Installs only what the machine's Python lacks of fcmae's dependencies (it is expected to have
# torch, timm, lightning, tensorboard, safetensors and matplotlib): from .whl/ when that folder
# holds wheels (bash scripts/gpu_wheels.sh, run where there is network), else from PyPI; then
# fcmae itself, editable and without dependencies. PYTHON picks the interpreter (default python3).
# Exit status: 0 when every part that ran had no error.
set -uo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
declare -A pip_name=([jsonargparse]=jsonargparse [docstring_parser]=docstring-parser
                     [typeshed_client]=typeshed-client [webdataset]=webdataset [braceexpand]=braceexpand
                     [segmentation_models_pytorch]=segmentation-models-pytorch [torchmetrics]=torchmetrics)
missing=()
for module in "${!pip_name[@]}"; do
    "$py" -c "import $module" 2>/dev/null || missing+=("${pip_name[$module]}")
done
# From .whl/ without dependencies: theirs are on such a machine already (scripts/gpu_wheels.sh).
# One package at a time, and no stop when one fails: the parts that need it record the error.
wheels=(); compgen -G ".whl/*.whl" >/dev/null && wheels=(--no-index --no-deps --find-links .whl)
for name in "${missing[@]}"; do
    echo "installing $name${wheels:+ from .whl/}"
    "$py" -m pip install -q "${wheels[@]}" "$name" || echo "gpu_check: could not install $name (no network? run scripts/gpu_wheels.sh)" >&2
done
"$py" -m pip install -q --no-deps --no-build-isolation -e . || { echo "gpu_check: could not install fcmae" >&2; exit 1; }
args=("$@")
[[ " $* " == *" --device "* ]] || args=(--device cuda "${args[@]}")
exec "$py" scripts/gpu_check.py "${args[@]}"
