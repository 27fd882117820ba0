"""Type checks of user-given values, shared by the pipeline's and the server's validation (imports nothing of ours)."""

from __future__ import annotations

import math
from typing import Any


def is_int(value: Any) -> bool:
    """An integer, not a bool (``True`` is an int to Python, never a count to a user)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
