"""Operating the server: Prometheus metrics, request ids and timing, logs."""

from .logs import configure_logging
from .metrics import CONTENT_TYPE_LATEST, Metrics
from .middleware import ObservabilityMiddleware, RequestRecord, asked_path, note_error, record_of

__all__ = [
    "CONTENT_TYPE_LATEST", "Metrics", "ObservabilityMiddleware", "RequestRecord", "asked_path", "configure_logging",
    "note_error", "record_of",
]
