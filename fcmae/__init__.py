"""fcmae: FCMAE self-supervised pre-training of ConvNeXt V2 encoders, then fine-tuning."""
from fcmae.model import FCMAE
from fcmae.predict import Classifier

__all__ = ["FCMAE", "Classifier"]
__version__ = "0.1.0"
