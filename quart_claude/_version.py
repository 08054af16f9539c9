"""The package's version: a leaf, so the core can name it without importing the package face."""

__version__ = "0.1.0"
