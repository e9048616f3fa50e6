"""fnexport: FasterNet checkpoints to verified deployment artifacts."""

from fnexport.api import Artifact, convert, load, parity, val
from fnexport.version import __version__

__all__ = ["Artifact", "__version__", "convert", "load", "parity", "val"]
