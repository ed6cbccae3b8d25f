"""``efficientad demo``: ``scenario`` (settings, the synthetic line), ``run`` (the run),
``console`` (live output), ``scorecard`` (against the ground truth), ``commands``."""
