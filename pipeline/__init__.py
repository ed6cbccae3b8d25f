"""The streaming line: ``core`` (what every stage shares), ``stages`` (capture, publisher,
subscribe, supervisor; the worker is the top-level ``worker`` package) and ``tools`` (demo,
benches, synthetic scene). See README.md, "Code layout"."""
