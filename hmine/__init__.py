"""hmine: mine interpretable directions in the h-space of diffusion models."""

__version__ = "0.1.0"
