"""One base class for every error branchnet raises on purpose.

Every error that a user can cause (a bad config, a missing file, a damaged checkpoint, an
unfittable tree) derives from :class:`BranchnetError`, so a caller catches them all with one
``except`` and the command line prints them as ``branchnet: error: ...`` without a traceback.
Each subclass also derives from the builtin exception it used to be (``ValueError``,
``RuntimeError``, ``FileNotFoundError``), so existing ``except ValueError`` code keeps working.

Example:
    >>> from branchnet.errors import BranchnetError, ConfigError
    >>> issubclass(ConfigError, BranchnetError) and issubclass(ConfigError, ValueError)
    True
"""

from __future__ import annotations

__all__ = ["BranchnetError", "ConfigError", "DamagedFileError", "WriteError"]


class BranchnetError(Exception):
    """Base class of every error branchnet raises for a user's input or files."""


class ConfigError(BranchnetError, ValueError):
    """A config file, key, value or override is invalid."""


class DamagedFileError(BranchnetError, ValueError):
    """A file branchnet wrote (JSON, safetensors) cannot be read back."""


class WriteError(BranchnetError, OSError):
    """A file could not be written (a full disk, a read-only folder); the message names it.
    An ``OSError`` still, with the ``errno`` of the failure."""

    def __str__(self) -> str:
        return str(self.strerror) if self.strerror else super().__str__()
