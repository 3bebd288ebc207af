"""The one exception type users see: its message is a single line that names the problem.

The CLI prints it without a traceback; the ComfyUI nodes let it surface as the node error.
It is deliberately not a ``ValueError``: an ``except ValueError`` around a library call (json,
PIL, numpy) must not swallow our own message, and our handlers must name it to catch it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a missing file, a wrong kind of checkpoint, an empty folder ...)."""

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(str(message).split()))
