"""The MinkowskiEngine backend's own machinery: its convolution modules are built once per shape
(not per block and step), its GRN statistics are float32 sums, and it leaves torch's thread count
as the caller set it."""
import torch

from helpers import TINY, minkowski


def test_convolution_modules_built_once_per_shape(monkeypatch):
    ME = minkowski()
    from fcmae.encoders.minkowski import MINKOWSKI
    from fcmae.model import FCMAE

    built = []
    for cls in (ME.MinkowskiChannelwiseConvolution, ME.MinkowskiConvolution):
        def counting_init(self, *args, _init=cls.__init__, **kwargs):
            built.append(type(self))
            _init(self, *args, **kwargs)
        monkeypatch.setattr(cls, "__init__", counting_init)
    monkeypatch.setattr(MINKOWSKI, "_convolutions", {})  # as in a fresh process
    model = FCMAE(TINY, "minkowski", img_size=64, decoder_dim=16)
    for _ in range(2):
        loss, _, _ = model(torch.randn(2, 3, 64, 64))
        loss.backward()
    # 4 depthwise shapes (one per stage, 9 blocks) and 3 downsamplings, built during the first step only
    assert len(built) == 7 and len(MINKOWSKI._convolutions) == 7


def test_grn_statistics_float32_and_threads_kept():
    ME = minkowski()
    from fcmae.encoders.minkowski import MINKOWSKI, MinkowskiRows
    threads = torch.get_num_threads()
    try:
        coords = torch.tensor([[0, 0, 0], [0, 0, 4], [1, 4, 0]], dtype=torch.int)
        layout = MinkowskiRows(MINKOWSKI, ME, ME.SparseTensor(torch.zeros(3, 2), coordinates=coords), 2)
        rows = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]).bfloat16()
        norm = layout.per_sample_norm(rows)
        assert norm.dtype == torch.float32
        assert torch.allclose(norm, torch.tensor([[10 ** 0.5, 20 ** 0.5], [5.0, 6.0]]))

        from fcmae.model import FCMAE
        torch.set_num_threads(1)
        model = FCMAE(TINY, "minkowski", img_size=64, decoder_dim=16)
        model(torch.randn(1, 3, 64, 64))[0].backward()
        assert torch.get_num_threads() == 1  # MinkowskiEngine's default manager would have set min(cores, 20)
    finally:
        torch.set_num_threads(threads)
