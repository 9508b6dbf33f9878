"""fcmae: FCMAE self-supervised pre-training of ConvNeXt V2 encoders, then fine-tuning and segmentation."""
from fcmae.classifier import Classifier
from fcmae.model import FCMAE
from fcmae.segmenter import Segmenter

__all__ = ["FCMAE", "Classifier", "Segmenter"]
__version__ = "0.1.0"
