"""The `dense` backend: the reference. Dense convolutions over the whole map, with inputs and
outputs zeroed at masked positions (and GRN's norm over visible positions only), which is what a
submanifold sparse computation gives. Runs wherever torch runs, in any autocast precision."""


class DenseBackend:
    name = "dense"

    def unavailable(self, device=None):
        return None

    def forward(self, encoder, imgs, visible):
        """imgs (N, C, H, W), visible: a `backends.Visibility` -> last-stage features
        (N, C_last, H/32, W/32), zero at masked positions."""
        visible = visible.stages()  # per-stage bool maps (N, H/s, W/s), s = 4..32
        x = imgs
        for i, (downsample, stage) in enumerate(zip(encoder.downsample_layers, encoder.stages)):
            keep = visible[i].unsqueeze(-1).to(imgs.dtype)  # (N, h, w, 1)
            # Stem and downsampling see only their own (aligned) patches; zero what they
            # write at masked positions.
            x = downsample(x) * keep.permute(0, 3, 1, 2)
            for block in stage:
                x = block(x, keep)
        return x


DENSE = DenseBackend()
