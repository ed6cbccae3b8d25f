"""The pipeline's ground floor: wire format, configuration, Redis, observability, lifecycle,
heat-map convention. It imports nothing above it and nothing of ``models``."""
