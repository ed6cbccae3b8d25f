"""The ML core: EfficientAD networks, training, calibration, evaluation and the inference engine.
It knows nothing of Redis or the pipeline; ``commands`` are its CLI entries."""
