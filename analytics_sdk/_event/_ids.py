"""Event ids: UUIDv7 (RFC 9562) strings, time-ordered, safe across fork and snapshot restore."""

from __future__ import annotations

import os
import time

__all__ = ["new_event_id"]

# The random part of event ids: os.urandom, 10 bytes read per id. Not a seeded generator, nor a buffer
# drawn ahead: both are memory, which a VM or container snapshot restored twice (Firecracker, CRIU,
# Lambda SnapStart) replays, so both copies would emit the same ids and the sink's dedupe on event_id
# would silently drop the second event. The kernel reseeds on a VM generation change; ~0.5 us here.
_urandom = os.urandom
_time_ns = time.time_ns  # bound once: this runs in every track()
# The variant nibble "10xx" from a random hex digit: keeps its two low bits.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}
# (unix ms, its "xxxxxxxx-xxxx-7"), replaced as one tuple so threads never pair a ms with another's text
_ms_prefix: list[tuple[int, str]] = [(-1, "")]


def new_event_id() -> str:
    """A UUIDv7 (RFC 9562) as a string: 48 bits of Unix milliseconds, version 7, 74 random bits.

    Time-ordered ids land at the right edge of the ``event_id`` unique index instead of at random
    pages, so inserts stay cheap as the table grows; and it costs less than ``str(uuid4())``.
    """
    ms = _time_ns() // 1_000_000
    cached_ms, prefix = _ms_prefix[0]
    if cached_ms != ms:
        prefix = f"{ms >> 16:08x}-{ms & 0xFFFF:04x}-7"
        _ms_prefix[0] = (ms, prefix)
    r = _urandom(10).hex()  # 20 hex digits: 3 of rand_a, then 1 (2 bits) + 3 + 12 of rand_b
    return f"{prefix}{r[:3]}-{_VARIANT[r[3]]}{r[4:7]}-{r[7:19]}"
