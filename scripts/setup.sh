#!/usr/bin/env bash
# One-step set-up on a fresh machine: a virtual environment in .venv with fcmae installed
# (editable) and its test tools. `--minkowski` also builds MinkowskiEngine (optional backend).
set -euo pipefail
cd "$(dirname "$0")/.."

with_minkowski=0
for arg in "$@"; do
  case "$arg" in
    --minkowski) with_minkowski=1 ;;
    *) echo "usage: bash scripts/setup.sh [--minkowski]" >&2; exit 2 ;;
  esac
done

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip
# constraints.txt pins torch/torchvision to the builds verified on our machines (docs/install.md);
# pyproject.toml keeps ranges for everyone else.
pip install -q -c constraints.txt -e ".[test]"
if [ "$with_minkowski" = 1 ]; then
  PYTHON=.venv/bin/python bash scripts/install_minkowski.sh
fi
.venv/bin/python -c "import fcmae, torch; print(f'fcmae {fcmae.__version__} ready (torch {torch.__version__})')"
