"""Errors the user can fix. The entry points print them as one line and exit with code 2."""


class PpmocoError(Exception):
    """Base class: a problem with the user's input (config, data, weights, disk), not a bug."""

    exit_code = 2


class ConfigError(PpmocoError):
    """An unknown key, a wrong type or an impossible value in the config."""


class DataError(PpmocoError):
    """A dataset, list file or image that cannot be used."""


class CheckpointError(PpmocoError):
    """Missing, incomplete or mismatched weights or checkpoints."""
