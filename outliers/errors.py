"""Every exception the toolkit raises on purpose.

One base class, ``OutliersError``, so that a CLI or a notebook can catch the
toolkit's own errors apart from bugs. Each subclass also derives from the
builtin a caller would expect (``ValueError``, ``FileNotFoundError``, ...), so
``except ValueError`` keeps working for code that does not know this module.
Messages name the bad input and, where there is one, the fix.
"""

__all__ = [
    "OutliersError",
    "UnknownModelError",
    "MissingPackageError",
    "ModelFileError",
    "HubUnavailableError",
    "CorpusError",
    "InvalidArgumentError",
    "OutputPathError",
]


class OutliersError(Exception):
    """Base class of the toolkit's deliberate errors."""


class UnknownModelError(OutliersError, LookupError):
    """A model spec that is no built-in name, no existing path and no hub id."""


class MissingPackageError(OutliersError, ModuleNotFoundError):
    """A built-in model (or an optional feature) needs a package that is not installed."""


class ModelFileError(OutliersError, OSError):
    """A model file or folder that is missing, corrupt or truncated."""


class HubUnavailableError(OutliersError, ConnectionError):
    """A hub id was asked for but no hub can be reached (and nothing is cached)."""


class CorpusError(OutliersError, ValueError):
    """A corpus that is missing, empty, undecodable or too short for the request."""


class InvalidArgumentError(OutliersError, ValueError):
    """An argument outside its valid range, e.g. ``window < 2``."""


class OutputPathError(OutliersError, OSError):
    """An output path that cannot be written."""
