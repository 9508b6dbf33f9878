#!/usr/bin/env bash
# Builds and installs MinkowskiEngine 0.5.4 (the optional `minkowski` backend) into the current
# Python environment, caching the built wheel outside the repository so later runs skip the build.
#
#   bash scripts/install_minkowski.sh            # uses `python` on PATH (activate your venv first)
#   PYTHON=.venv/bin/python bash scripts/install_minkowski.sh
#
# CPU machines build a CPU-only wheel (6-7 min on 2 cores); machines with nvcc and a CUDA torch
# build the CUDA kernels. The cache key includes torch's version and CUDA flavour.
set -euo pipefail

PYTHON=$(command -v "${PYTHON:-python}")
PYTHON=$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")
ME_VERSION=0.5.4
CACHE=${FCMAE_WHEEL_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/fcmae/wheels}

if "$PYTHON" -c "import MinkowskiEngine" 2>/dev/null; then
  echo "MinkowskiEngine already installed"; exit 0
fi

flavour=$("$PYTHON" -c "import torch, sys; print(f'torch{torch.__version__}-cp{sys.version_info[0]}{sys.version_info[1]}'.replace('+', '_'))")
wheel_dir="$CACHE/minkowski-$ME_VERSION-$flavour"
mkdir -p "$wheel_dir"

if ! ls "$wheel_dir"/MinkowskiEngine-*.whl >/dev/null 2>&1; then
  # Its setup.py finds BLAS through numpy.distutils: it needs OpenBLAS headers and setuptools<70.
  if ! [ -e /usr/include/x86_64-linux-gnu/openblas-pthread/cblas.h ] && ! ls /usr/include/*/cblas.h /usr/include/cblas.h >/dev/null 2>&1; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq libopenblas-dev
    else
      echo "error: OpenBLAS headers are missing: install libopenblas-dev (Debian/Ubuntu) and rerun" >&2
      exit 1
    fi
  fi
  "$PYTHON" -m pip install -q "setuptools<70" wheel
  build=$(mktemp -d)
  # setup.py imports torch, so no build isolation; without a GPU it builds CPU-only by itself.
  # MAX_JOBS keeps memory in check on small machines.
  (cd "$build" && MAX_JOBS=${MAX_JOBS:-$(nproc)} "$PYTHON" -m pip wheel --no-build-isolation --no-deps \
     -w "$build/out" "MinkowskiEngine==$ME_VERSION")
  mv "$build"/out/MinkowskiEngine-*.whl "$wheel_dir"/
  rm -rf "$build"
  "$PYTHON" -m pip install -q "setuptools>=77"
fi

"$PYTHON" -m pip install -q --no-deps "$wheel_dir"/MinkowskiEngine-*.whl
# 0.5.4 predates Python 3.10, which moved the ABCs out of `collections`: point its imports there.
me_dir=$("$PYTHON" -c "import importlib.util as u; print(u.find_spec('MinkowskiEngine').submodule_search_locations[0])")
grep -rl "from collections import Sequence" "$me_dir" | xargs -r sed -i \
  -e 's/^from collections import Sequence, namedtuple$/from collections import namedtuple\nfrom collections.abc import Sequence/' \
  -e 's/^from collections import Sequence$/from collections.abc import Sequence/'
"$PYTHON" -c "import MinkowskiEngine as ME; print('MinkowskiEngine', ME.__version__, 'installed')"
