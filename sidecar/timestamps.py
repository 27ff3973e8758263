"""The one rule for a timestamp read from outside (a token's `exp`/`nbf`/`iat`, an introspection `exp`, a signed
cookie's or key's expiry, a cached verdict's deadline): seconds since the epoch as a JSON number.

RFC 7519 §2 (NumericDate) says "a JSON numeric value"; Python's `json` also accepts `NaN` and `Infinity`, bools are
ints to Python, and PyJWT reads `"123"` as a number. None of those is a time: `Infinity` never expires, `NaN` makes
every comparison false (so every check passes), a huge integer overflows `float()`/`datetime`. Reading a timestamp
through `timestamp()` is the only way these are told apart from a real one."""

from __future__ import annotations

from typing import Any

# Year 5138: far beyond any real lifetime, far below float and datetime limits. Before 1970 is no real clock either.
MAX_TIMESTAMP = 1e11


def timestamp(value: Any) -> float | None:
    """`value` as seconds since the epoch, or None when it is not a finite JSON number in [0, MAX_TIMESTAMP] (null,
    a string, a bool, NaN, ±Infinity, a huge or negative number)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    if not 0 <= value <= MAX_TIMESTAMP:  # NaN fails every comparison; an int is compared exactly, never overflows
        return None
    return float(value)


__all__ = ["MAX_TIMESTAMP", "timestamp"]
