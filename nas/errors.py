"""User-facing errors: one line that names the file or value, the key and the fix.

Scripts turn a ``NasError`` into that line on stderr and exit status 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable


class NasError(Exception):
    """A mistake in the user's input (a file, a string, an option) rather than in `nas` itself."""


class SpaceError(NasError):
    """A search-space file that cannot be loaded: names the file, the key and what is allowed."""

    def __init__(self, source: str, key: str, message: str):
        self.source, self.key = source, key
        super().__init__(f"{source}: {key}: {message}")


class ArchStringError(NasError):
    """An architecture string that does not parse: names the string, the token and the fix."""

    def __init__(self, text: str, token: str, message: str):
        self.text, self.token = text, token
        super().__init__(f"architecture {text!r}: {token!r}: {message}")


def exit_on_user_error(main: Callable[..., int | None]) -> Callable[..., int]:
    """Decorate a script's ``main``: a NasError becomes one stderr line and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except NasError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2

    return wrapper
