from .fcmae_decoder import FCMAEDecoder

__all__ = ["FCMAEDecoder"]
