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


class ExportError(PpmocoError):
    """An export that cannot be made: a missing export dependency, an output folder that is not
    the export's to replace, or an exported model that does not reproduce the backbone."""
