"""The stages of the line (each with its ``commands``): capture, publisher (with the alarm state
machine), subscribe and the supervisor that runs them all; the worker is ``worker``."""
