"""The error of a bad setting: a leaf, so each feature that parses its own settings raises it
without importing the configuration that assembles them."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration value is missing or invalid; the message names the key."""
