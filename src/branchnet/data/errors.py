"""The error of the data layer, in a module of its own so that every data module can raise it.

    >>> from branchnet.errors import BranchnetError
    >>> issubclass(DataError, BranchnetError) and issubclass(DataError, ValueError)
    True
"""

from __future__ import annotations

from branchnet.errors import BranchnetError


class DataError(BranchnetError, ValueError):
    """Raised when data is missing, malformed or inconsistent."""
