"""Test helpers that run anomalib's own EfficientAD code from its PyPI wheel (nothing committed)."""
