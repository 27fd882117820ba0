"""User errors of the commands: one line ``unnoise <command>: error: argument FLAG: ...``, exit status 2."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator


class UsageError(Exception):
    """A user error: the command prints it as one line through its parser's ``error`` (exit status 2)."""


@contextlib.contextmanager
def user_errors(
    flag: str | None = None,
    flags: dict[str, str] | None = None,
    kinds: tuple[type[Exception], ...] = (ValueError, OSError),
) -> Iterator[None]:
    """Turn ``kinds`` of exceptions into a ``UsageError`` naming ``flag``, else the flag that ``flags`` maps the
    message's leading ``field=`` to (the pipeline's errors start with the field they reject)."""
    try:
        yield
    except kinds as error:
        message = str(error)
        if flag is None:
            name = re.match(r"([\w.]+)=", message)  # "field=" or "group.field=" (hires.scale=...)
            if name is not None and flags:
                flag = flags.get(name[1], flags.get(name[1].split(".")[0]))
            else:
                flag = None
        raise UsageError(f"argument {flag}: {message}" if flag else message) from None
