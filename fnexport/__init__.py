"""fnexport: FasterNet checkpoints to verified deployment artifacts."""

from fnexport.version import __version__

__all__ = ["__version__"]
