from fcmae.masking import upsample_mask

from .backends import BACKEND_CHOICES, BACKENDS, check_backend, resolve_backend
from .convnextv2 import MODELS, SIZES, ConvNeXtV2, create_model
from .sparse_convnextv2 import SparseConvNeXtV2

__all__ = ["BACKENDS", "BACKEND_CHOICES", "MODELS", "SIZES", "ConvNeXtV2", "SparseConvNeXtV2", "check_backend",
           "create_model", "resolve_backend", "upsample_mask"]
