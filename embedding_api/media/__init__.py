"""Media from clients: policy and errors, SSRF-safe fetching, inline base64, image decoding."""

from .images import decode_image_bytes
from .loader import ImageLoader
from .policy import MediaError, MediaPolicy

__all__ = ["MediaError", "MediaPolicy", "ImageLoader", "decode_image_bytes"]
