"""Pre-trained weights into the segmenter's encoder.

Any `Weights` that fcmae.checkpoints.read_weights reads (an fcmae encoder or classifier export, a
pre-training or fine-tuning last.ckpt, a segmentation export, the release's checkpoints, timm's
layout) carries a dense public-layout encoder (`Weights.encoder`: downsample_layers.*, stages.*);
it goes into `UperNetSegmenter.encoder` only if it fits tensor for tensor, by the rule fine-tuning
refuses misfits with (`fcmae.checkpoints.misfit`). A classifier's final norm and head are
left out: the segmenter has neither.
"""
import json

from fcmae.checkpoints import KINDS, misfit, size_name


def load_encoder(segmenter, weights):
    """Load `weights.encoder` into `segmenter.encoder`. Returns {"loaded": tensor count, "kind":
    the file's kind in words, "left_out": the file's tensors not used (a classifier's norm and
    head)}. Weights of another size or in_chans are a one-line ValueError naming the file, the
    model and the first tensor that differs."""
    encoder = segmenter.encoder
    state = weights.encoder
    problem = misfit(encoder.state_dict(), state, optional=())
    if problem:
        size = size_name(encoder.depths, encoder.dims) or json.dumps({"depths": list(encoder.depths),
                                                                       "dims": list(encoder.dims)})
        raise ValueError(f"{weights.path} does not fit ConvNeXt V2 {size} with in_chans {encoder.in_chans}: "
                         f"{problem[0]}")
    encoder.load_state_dict(state)
    return {"loaded": len(state), "kind": KINDS[weights.kind],
            "left_out": sorted(k for k in weights.state if k not in state)}
