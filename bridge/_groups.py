"""The drain's fresh claims (:meth:`bridge.drain._Drain.claim_fresh`): a transaction's worth of
claims taken in two round trips, whatever the claim size."""

from __future__ import annotations

import uuid

from analytics_sdk._queue import Claim, QueueKeys, claim, claim_many, new_token

from ._writer import BatchWriter

__all__ = ["claim_group"]


async def claim_group(writer: BatchWriter, keys: QueueKeys) -> tuple[list[Claim], bool]:
    """Claims of ``analytics_batch_size`` from the shard ``keys`` until a transaction's worth of rows;
    True if that shard is drained. (A group is one shard's: its ack is one script in one slot.)

    One claim first: a queue shorter than a claim (the common case of a prompt flush) costs one
    round trip. When it came back full, the rest of the transaction's claims go in one pipeline
    (:func:`claim_many`) instead of one round trip each: 49 fewer per transaction on the defaults."""
    size = writer.settings.analytics_batch_size
    per_transaction = max(size, writer.settings.analytics_insert_batch_size)
    claims: list[Claim] = []
    attempts = [(uuid.uuid4().hex, new_token())]
    try:
        taken = await claim(writer.redis, keys, size, *attempts[0])
        _keep(writer, claims, [taken])
        if len(taken.items) < size:
            return claims, True
        attempts = [(uuid.uuid4().hex, new_token()) for _ in range(-(-per_transaction // size) - 1)]
        more = await claim_many(writer.redis, keys, size, attempts) if attempts else []
    except BaseException:
        # A claim may have run with its reply lost: give back whatever it took, and the claims
        # already in hand, so they are not stranded until their leases expire.
        await writer.release([*claims, *(Claim(b, [], 0, t, keys) for b, t in attempts)])
        raise
    _keep(writer, claims, more)
    return claims, any(len(c.items) < size for c in more)


def _keep(writer: BatchWriter, claims: list[Claim], taken: list[Claim]) -> None:
    for c in taken:
        if c.items:
            claims.append(c)
            writer.keeper.hold([c])
