"""catbatch: batch text-to-image generation on Ray, with CAT token pruning."""

__version__ = "0.1.0"
