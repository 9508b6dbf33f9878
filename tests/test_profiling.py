"""The step breakdown by kind of work (fcmae.profiling): each kind gets the operators that are
its own, the shares add up to the step, the matrix FLOPs are counted from shapes; the machine's
own matrix-product rate is a rate."""
import pytest
import torch
import torch.nn.functional as F

from fcmae import profiling
from fcmae.encoders.depthwise import DepthwiseConv2d


def test_each_kind_gets_its_own_operators():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 128)
    dw = DepthwiseConv2d(8)
    opt = torch.optim.AdamW(list(lin.parameters()) + list(dw.parameters()))
    a = torch.randn(256, 64)
    maps = torch.randn(2, 8, 16, 16)
    idx = torch.arange(0, 256, 2)

    def step():
        opt.zero_grad()
        y = F.gelu(lin(a)).index_select(0, idx)  # (128, 128)
        z = dw(maps)
        (y.sum() + z.sum()).backward()
        opt.step()

    step()
    b = profiling.step_breakdown(step, repeats=2)
    s = b["seconds"]
    assert set(s) == set(profiling.KINDS)
    for kind in ("matrix products", "depthwise conv", "norms and elementwise", "gather/scatter/copy", "optimizer"):
        assert s[kind] > 0, kind
    assert sum(s.values()) == pytest.approx(b["wall_s"], rel=0.05)
    # forward 256x64x128, backward: input not needed (a is data), weight gradient 128x256x64
    assert b["matmul_flop"] == pytest.approx(2 * 256 * 64 * 128 * 2, rel=0.01)
    lines = profiling.format_breakdown(b, rate=1e11, step_flop=1e6)
    assert len(lines) == len(profiling.KINDS) + 3 and "of this machine's 100 GFLOP/s" in lines[-2]


def test_conv_flops_and_depthwise_classification():
    """A 2x2 stride-2 conv is a matrix product with its FLOPs; a 7x7 depthwise is depthwise."""
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    w = torch.randn(16, 8, 2, 2, requires_grad=True)
    dw = torch.randn(8, 1, 7, 7, requires_grad=True)
    b = profiling.step_breakdown(
        lambda: (F.conv2d(x, w, stride=2).sum() + F.conv2d(x, dw, padding=3, groups=8).sum()).backward())
    out = 2 * 16 * 8 * 8  # output elements of the 2x2 conv
    assert b["matmul_flop"] == pytest.approx(2 * out * 8 * 4 * 3, rel=0.01)  # forward + input and weight grads
    assert b["seconds"]["depthwise conv"] > 0


def test_count_syncs_sees_reads_and_nonzero():
    x = torch.tensor([0.0, 1.0, 2.0])
    counts = profiling.count_syncs(lambda: (x.nonzero(), x.sum().item(), bool(x[1])))
    assert counts["aten::nonzero"] == 1
    assert counts["aten::_local_scalar_dense"] == 2
    assert sum(profiling.count_syncs(lambda: (x * 2).sum()).values()) == 0


def test_matmul_rate_is_a_rate():
    rate = profiling.matmul_rate(n=256, repeats=1)
    assert 1e8 < rate < 1e14
