"""Erasure probe engine: does a concept really leave a diffusion model?"""

__version__ = "0.1.0"
