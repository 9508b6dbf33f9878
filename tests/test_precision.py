"""What `--precision auto` picks (fcmae.precision): on the CPU bf16-mixed only with bf16 matrix
products in hardware (AMX or AVX-512 BF16, read from the CPU's flags), and the one line a run
prints about it."""
import pytest

from fcmae import precision
# the real functions (tests/conftest.py pins precision.cpu_bf16_units)
from fcmae.precision import cpu_bf16_units as read_bf16_units, cpu_flags as read_cpu_flags
from helpers import PRETRAIN_TINY, parse_pretrain


@pytest.fixture
def cpu(monkeypatch):
    """Set the CPU's flags; no GPU visible."""
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: False)
    return lambda *flags: monkeypatch.setattr(precision, "cpu_bf16_units", lambda: read_bf16_units(flags))


@pytest.mark.parametrize("flags, picked", [
    (("avx512f", "avx512_vnni"), "32"),  # AVX-512 without bf16: emulated, no faster (this project's CI machines)
    (("avx512f", "avx512_bf16"), "bf16-mixed"),
    (("avx512f", "amx_tile", "amx_bf16"), "bf16-mixed"),
    ((), "32"),
])
def test_auto_on_the_cpu_follows_its_bf16_flags(cpu, flags, picked):
    cpu(*flags)
    assert precision.resolve_precision("auto") == picked
    assert precision.resolve_precision("auto", "cpu") == picked
    chosen, why = precision.auto_precision("cpu")
    assert chosen == picked and ("AMX" in why if picked == "32" else flags[-1] in why)
    assert precision.resolve_precision("32") == "32" and precision.resolve_precision("bf16") == "bf16-mixed"


def test_a_gpu_decides_unless_the_run_is_on_the_cpu(monkeypatch, cpu):
    cpu("avx512f")
    monkeypatch.setattr(precision.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(precision.torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.resolve_precision("auto", "gpu") == "bf16-mixed"
    assert precision.resolve_precision("auto", "cpu") == "32"


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx512f amx_bf16 amx_tile\n\nprocessor\t: 1\n")
    assert read_cpu_flags(info) == {"fpu", "avx512f", "amx_bf16", "amx_tile"}
    assert read_cpu_flags(tmp_path / "missing") == frozenset()


def test_bf16_units_from_flags_else_from_torchs_capability():
    assert read_bf16_units({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}) == ("amx_bf16", "avx512_bf16")
    assert read_bf16_units({"avx512f", "avx2"}) == ()
    # where /proc/cpuinfo cannot be read, torch's own CPU capability decides
    assert read_bf16_units(set(), capability="AVX512") == ()
    assert read_bf16_units(set(), capability="AMX_BF16") == ("amx_bf16",)


def test_a_run_says_what_auto_picked(cpu, tmp_path, capsys):
    from fcmae.commands.pretrain import fit

    cpu("avx512f", "amx_bf16")
    cfg = parse_pretrain(*PRETRAIN_TINY, "--precision", "auto", "--dry-run", "--output", str(tmp_path))
    assert cfg.precision == "auto"
    fit(cfg)
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("--precision auto")]
    assert lines == ["--precision auto -> bf16-mixed: the CPU has amx_bf16 (bf16 matrix products in hardware)"]
    assert "precision: bf16-mixed" in out  # the resolved configuration
