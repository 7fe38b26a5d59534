"""The package version (ground floor: checkpoints record it, so it cannot live in ``__init__``)."""

__version__ = "0.1.0"
