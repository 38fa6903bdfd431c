"""atproto TIDs: 13 characters of sortable base32 over a 64-bit integer whose
top 53 bits (after a zero bit) are microseconds since the epoch and whose low
10 bits are a clock id.

Knots stamp pipeline rkeys with their own clock this way, which is how tack
derives a knot cursor from what it actually processed; tack stamps its own
status events the same way.
"""

from __future__ import annotations

import re

ALPHABET = "234567abcdefghijklmnopqrstuvwxyz"
_INDEX = {c: i for i, c in enumerate(ALPHABET)}
TID_RE = re.compile(r"^[234567abcdefghij][234567abcdefghijklmnopqrstuvwxyz]{12}$")


def encode(micros: int, clock_id: int = 0) -> str:
    value = (micros << 10) | (clock_id & 0x3FF)
    chars = []
    for _ in range(13):
        chars.append(ALPHABET[value & 31])
        value >>= 5
    return "".join(reversed(chars))


def micros(tid: str) -> int | None:
    """The timestamp inside ``tid``, or None when it is not a TID."""
    if not TID_RE.match(tid):
        return None
    value = 0
    for char in tid:
        value = value * 32 + _INDEX[char]
    return value >> 10
