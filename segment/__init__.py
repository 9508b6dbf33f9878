"""Semantic segmentation: a UperNet on the dense ConvNeXt V2 encoder (installed as fcmae.segment).

model.py      the segmenter: encoder stages -> UperNet (segmentation_models_pytorch) + auxiliary FCN head
weights.py    any weights `read_weights` reads -> the segmenter's encoder
data.py       ADE20K and generic folders of images + PNG label maps, the training and eval pipelines
inference.py  logits at an image's own size: whole image or sliding window, multi-scale + flip
metrics.py    mIoU, mean and pixel accuracy, per class, from a confusion matrix synced over ranks
module.py     the LightningModule: the recipe (loss, layer-decayed AdamW, poly schedule, metrics)
export.py     the segmentation export (safetensors + metadata) and reading it back
segmenter.py  `fcmae.Segmenter`: an export on new images -> label maps, overlays, class fractions
report.py     predictions.png, the per-class table, curves.png
"""
