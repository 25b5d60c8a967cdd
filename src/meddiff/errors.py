"""Project-wide error types. Messages name the offending value and say how to fix it."""


class ConfigError(ValueError):
    """A configuration value is invalid (unknown name, out of range, inconsistent with another value)."""


class DataError(ValueError):
    """Input data is missing, corrupt or of the wrong shape/type."""
