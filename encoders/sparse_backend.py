"""The `sparse` backend: our fast path, in plain torch. Every pointwise step runs on the visible
rows of a stage only; the stem and the 2x2 downsampling are matrix products on the visible
patches (a masked patch never feeds a visible one); only the 7x7 depthwise conv runs dense, on a
zero-filled channels-last map. Runs wherever torch runs, in any autocast precision."""
import torch.nn.functional as F

from .rows import VisibleRows, drop_path_rows, layer_norm_rows


class SparseBackend:
    name = "sparse"

    def unavailable(self, device=None):
        return None

    def forward(self, encoder, imgs, visible):
        """imgs (N, C, H, W), visible: per-stage bool maps -> (N, C_last, H/32, W/32)."""
        rows = [VisibleRows(v) for v in visible]
        stem_conv, stem_norm = encoder.downsample_layers[0]
        x = F.linear(rows[0].patches(imgs, 4), conv_as_matrix(stem_conv.weight), stem_conv.bias)
        x = layer_norm_rows(x, stem_norm)  # (M0, C0)
        for i, stage in enumerate(encoder.stages):
            if i > 0:
                norm, conv = encoder.downsample_layers[i]
                x = layer_norm_rows(x, norm)
                children = rows[i].children_of(rows[i - 1])  # (M_i, 4)
                x = F.linear(x.index_select(0, children.reshape(-1)).view(children.shape[0], -1),
                             conv_as_matrix(conv.weight), conv.bias)
            r = rows[i]
            for block in stage:
                y = r.gather(block.dwconv(r.scatter(x)))  # (M, C)
                y = block.mlp(y, lambda t: block.grn.forward_rows(t, r))
                drop = getattr(block.drop_path, "drop_prob", 0.0)
                x = x + drop_path_rows(y, r.batch, r.shape[0], drop, encoder.training)
        return rows[3].scatter(x).contiguous()


def conv_as_matrix(weight):
    """A k x k stride-k conv weight (C_out, C_in, k, k) as a matrix over patches ordered
    (row, col, channel): (C_out, k*k*C_in)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


SPARSE = SparseBackend()
