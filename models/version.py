"""The package version, from the installed distribution's metadata (pyproject is the one source).

At the ground floor so that checkpoints and teachers can record it without importing the CLI.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["__version__"]

try:
    __version__ = version("efficientad-line")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
