"""EfficientAD line monitor: anomaly detection served over Redis Streams."""

__version__ = "0.1.0"
