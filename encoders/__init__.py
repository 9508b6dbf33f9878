from .convnextv2 import MODELS, SIZES, ConvNeXtV2, create_model
from .sparse_convnextv2 import BACKENDS, SparseConvNeXtV2, resolve_backend, upsample_mask

__all__ = ["BACKENDS", "MODELS", "SIZES", "ConvNeXtV2", "SparseConvNeXtV2", "create_model", "resolve_backend", "upsample_mask"]
