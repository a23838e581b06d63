"""User-facing errors.

Anything a user can cause (a bad folder, a bad flag, a corrupt file) raises `EvotokError`. The CLI turns
it into one line on stderr and exit code 2; every other exception is a bug and keeps its traceback.
"""

from __future__ import annotations


class EvotokError(Exception):
    """A problem the user can fix: the message says what, where, and how."""

    exit_code = 2

    def __init__(self, what: str, *, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        text = self.what if self.where is None else f"{self.where}: {self.what}"
        if self.fix:
            text += f" ({self.fix})"
        return " ".join(text.split())  # one line, whatever the parts held


class CheckpointError(EvotokError):
    """The model or adapter folder cannot be used as it is."""


class ConfigError(EvotokError):
    """A flag, option, config file or environment variable has a bad value."""


class DataError(EvotokError):
    """An input data file (prompts, training data, bench data) is malformed."""
