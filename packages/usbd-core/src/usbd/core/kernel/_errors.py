"""The one error kernel attachment raises: an OSError whose message is a full sentence."""

from __future__ import annotations

__all__ = ["KernelAttachError"]


class KernelAttachError(OSError):
    """Attaching, re-attaching or detaching /dev/nbdX failed.

    The message is meant for the user as it stands (the CLI prints it as one line), so it says
    what to do: load the module, pick another device, run as root, or use ``--listen``.
    """

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)

    def __str__(self) -> str:
        return str(self.strerror)
