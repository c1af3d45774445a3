"""The toolkit's own error types: every failure a user can cause ends in one of these, never a traceback."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ckpttool.model import Code


class CkptError(Exception):
    """A checkpoint cannot be read. `code` is a contract problem code (Code.CORRUPT, Code.TRUNCATED, ...)."""

    def __init__(self, code: Code, message: str, path=None):
        super().__init__(message)
        self.code = code
        self.path = str(path) if path is not None else None

    @property
    def reason(self) -> str:
        """The message without the path (for problem lists that carry the path separately)."""
        return self.args[0]

    def __str__(self):
        return f"{self.path}: {self.reason}" if self.path else self.reason


class UsageError(Exception):
    """The user asked for something impossible (missing path, unknown layout): exit code 2."""


class OutputError(Exception):
    """An output could not be written. Exit 1; the staging is gone and the input is untouched."""
