import sys
import warnings
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
# MinkowskiEngine warns on every import that it was built without CUDA.
warnings.filterwarnings("ignore", message="The MinkowskiEngine was compiled with CPU_ONLY flag")


@pytest.fixture(scope="session", autouse=True)
def _listing_cache(tmp_path_factory):
    """File listings are cached under $XDG_CACHE_HOME (fcmae.data.filelist.default_cache): a fresh one
    for the test session (child processes inherit it), not the user's ~/.cache."""
    import os
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        os.environ.pop("XDG_CACHE_HOME")
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture
def one_thread(monkeypatch):
    """One compute thread: on a shared 2-core machine more threads spin against each other."""
    threads = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _float32_cpu(monkeypatch):
    """`--precision auto` on the CPU sees no AMX or AVX-512 BF16 (fcmae.precision.cpu_bf16_units), so
    every run with the default precision computes in float32 whatever CPU runs the suite; the
    tests of the choice (tests/test_precision.py) give the flags they test."""
    import fcmae.precision
    monkeypatch.setattr(fcmae.precision, "cpu_bf16_units", lambda: ())
