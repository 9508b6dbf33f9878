"""The `sparse` backend: our fast path, in plain torch. Every pointwise step runs on the visible
rows of a stage only (`rows.VisibleRows`); the stem and the 2x2 downsampling are matrix products
on the visible patches (a masked patch never feeds a visible one; the rows' Z order makes the
downsampling's input a view); only the 7x7 depthwise conv runs dense, on a zero-filled
channels-last map (`depthwise.py`). Runs wherever torch runs, in any autocast precision. With the
visible count per sample given, the forward and backward make no host-device sync."""
import torch.nn.functional as F

from .rows import layer_norm_rows, stage_rows


class SparseBackend:
    name = "sparse"

    def unavailable(self, device=None):
        return None

    def forward(self, encoder, imgs, visible):
        """imgs (N, C, H, W), visible: a `backends.Visibility` -> (N, C_last, H/32, W/32)."""
        rows = stage_rows(visible.mask, visible.per_sample)
        stem_conv, stem_norm = encoder.downsample_layers[0]
        k = stem_conv.kernel_size[0]
        x = F.linear(rows[0].stem_patches(imgs, k), conv_as_matrix(stem_conv.weight), stem_conv.bias)
        x = layer_norm_rows(x, stem_norm)  # (M0, C0)
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                norm, conv = encoder.downsample_layers[i]
                x = F.linear(rows[i].children(layer_norm_rows(x, norm)), conv_as_matrix(conv.weight), conv.bias)
            for block in stage:
                x = block(x, rows[i])  # (M_i, C_i)
        return rows[3].scatter(x).contiguous()


def conv_as_matrix(weight):
    """A k x k stride-k conv weight (C_out, C_in, k, k) as a matrix over patches ordered
    (row, col, channel): (C_out, k*k*C_in)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


SPARSE = SparseBackend()
