"""fnexport: FasterNet checkpoints to verified deployment artifacts."""

__version__ = "0.1.0"
