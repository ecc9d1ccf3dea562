"""Errors that name the offending key or file and the fix."""

from __future__ import annotations


class EnigmaError(Exception):
    """Base class for user-facing errors."""


class ConfigError(EnigmaError):
    """One or more configuration problems, reported together."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} problem(s) in the configuration:\n{lines}")


class RunFolderMismatch(ConfigError):
    """A run folder trained with other values than the command's: neither resumed nor skipped, and left as it is."""


class DataError(EnigmaError):
    """Bad rows or files in a dataset, reported with their indices."""
