"""The one error the command line shows: a bad flag or setting, as one line, exit status 2."""

from __future__ import annotations

__all__ = ["OptionError", "UsageError"]


class UsageError(Exception):
    """Something the user asked for that cannot be done as asked; the message is one line that
    names the flag and what is accepted, and never contains a secret."""


class OptionError(UsageError, ValueError):
    """A driver's refusal of one of its options at start-up (a key that cannot be read, a
    store that does not match): ``-flag: message``."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"-{flag.lstrip('-')}: {message}")
        self.flag = flag
