"""Semantic segmentation, the task package beside the library (installed as fcmae.segment): a
UperNet (fcmae.decoders.upernet) trained on the dense ConvNeXt V2 encoder, and the task the run
layer drives. What a trained segmenter needs at inference lives in the library: fcmae.segmenter
(inference, `fcmae.Segmenter`), fcmae.labelmaps (palettes, pictures of label maps) and
fcmae.checkpoints (the segmentation files).

weights.py    any weights `read_weights` reads -> the segmenter's encoder
data.py       ADE20K and generic folders of images + PNG label maps, bad pairs, the data module
transforms.py the ADE20K training pipeline and the evaluation one
metrics.py    mIoU, mean and pixel accuracy, per class, from a confusion matrix synced over ranks
module.py     the LightningModule: the recipe (loss, layer-decayed AdamW, poly schedule, metrics)
report.py     predictions.png, the per-class table, curves.png
"""
