"""User-facing errors: one line that names the file or value, the key and the fix.

Scripts turn a ``NasError`` into that line on stderr and exit status 2, and show a ``NasWarning`` as
one ``warning:`` line; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
import warnings
from typing import Callable


class NasError(Exception):
    """A mistake in the user's input (a file, a string, an option) rather than in `nas` itself."""


class NasWarning(UserWarning):
    """Something the user should know and may fix (a table from another machine); the work goes on."""


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
    """Decorate a script's ``main``: a NasError or an unusable path becomes one stderr line and exit
    status 2; Ctrl-C one line and status 130."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        with warnings.catch_warnings():
            default = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if issubclass(category, NasWarning):  # our own: one line, no source location
                    print(f"warning: {message}", file=sys.stderr, flush=True)
                else:
                    default(message, category, filename, lineno, file, line)

            warnings.showwarning = show
            try:
                return main(*args, **kwargs) or 0
            except NasError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except OSError as exc:
                if exc.filename is None:  # not about a path the user gave: a bug, keep the traceback
                    raise
                print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
                return 2
            except KeyboardInterrupt:  # whatever finished is journaled or kept; the same command resumes
                print("\ninterrupted: run the same command again to resume", file=sys.stderr)
                return 130

    return wrapper
