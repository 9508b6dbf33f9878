"""fcmae: FCMAE self-supervised pre-training of ConvNeXt V2 encoders, then fine-tuning."""
from fcmae.classifier import Classifier
from fcmae.model import FCMAE

__all__ = ["FCMAE", "Classifier"]
__version__ = "0.1.0"
