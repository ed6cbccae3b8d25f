"""EfficientAD line monitor: anomaly detection served over Redis Streams (the CLI layer)."""

from models.version import __version__

__all__ = ["__version__"]
