"""Exceptions distrl raises for bad input, each naming the file, line or field at fault."""


class DistrlError(Exception):
    """Base class: a problem the user can fix, reported without a traceback by the CLIs."""


class ConfigError(DistrlError, ValueError):
    """A config key, value or type is wrong (the message names the dotted field)."""


class DataError(DistrlError, ValueError):
    """A data file is unreadable or malformed (the message names the file and line)."""


class AssetError(DistrlError, FileNotFoundError):
    """A packaged offline asset is missing (the message says what to run)."""


class ModelError(DistrlError, ValueError):
    """A model or tokenizer cannot be loaded or does not fit its pair."""


class RewardError(DistrlError, ValueError):
    """A reward component failed, returned the wrong length or a non-finite value."""
