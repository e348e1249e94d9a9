"""Redis key names: every key the SDK and the bridge use is built in this one module.

All keys start with the configured prefix (``analytics_key_prefix``); for Redis Cluster make the
prefix a hash tag such as ``{analytics}`` so that the scripts' keys share one slot.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["QueueKeys"]


@dataclass(frozen=True, slots=True)
class QueueKeys:
    """The key names of one queue (one prefix)."""

    prefix: str = "analytics"

    @property
    def queue(self) -> str:
        # list: producers RPUSH at the tail, drains LPOP from the head, so the oldest leave first
        return f"{self.prefix}:events:batch"

    def inflight(self, batch_id: str) -> str:
        # list: the items one claim took, kept until their rows commit (the crash-safety copy)
        return f"{self.prefix}:events:inflight:{batch_id}"

    @property
    def leases(self) -> str:
        # sorted set: batch_id scored by its owner's last claim, take-over or renewal, in ms of Redis's
        # own clock (TIME); an old score = a dead or stalled drain; 0 = released by its owner for the
        # next drain at once (an outage, a shutdown): taking over a released lease is not a death
        return f"{self.prefix}:events:inflight"

    @property
    def owners(self) -> str:
        # hash: batch_id -> owner token of the drain holding the lease. A take-over writes a new
        # token, and ack/split/renew/release act only for the current one: a drain paused past its
        # lease (a VM pause, a long bisection) can no longer ack or dead-letter what another finished
        return f"{self.prefix}:events:owners"

    def push_guard(self, token: str) -> str:
        # string with PX: the result of one push, keyed by the push's own token, so a push whose
        # reply was lost and is sent again returns the first result instead of queueing twice
        return f"{self.prefix}:events:pushed:{token}"

    @property
    def reclaims(self) -> str:
        # hash: batch_id -> times taken over; past a limit the batch is bisected (no poison loop)
        return f"{self.prefix}:events:reclaims"

    @property
    def dead(self) -> str:
        # list: JSON {"payload", "error", "failed_at", ...} for items that can never be inserted
        return f"{self.prefix}:events:dead"

    @property
    def dropped(self) -> str:
        # counter: events the cap trimmed off the head (LTRIM itself reports nothing)
        return f"{self.prefix}:events:dropped"

    @property
    def stats(self) -> str:
        # hash: inserted, duplicates, dead, claimed, last_flush_at, last_summary for `status`
        return f"{self.prefix}:stats"

    @property
    def flush_cooldown(self) -> str:
        # string with PX: the open cooldown window of the backlog trigger (a debounce): the client
        # that opens it sends a flush now; a suppressed trigger schedules one flush for the window's
        # end, which opens the next window ("trailing:<ms>" says one is scheduled), so a burst from
        # many clients sends one task per cooldown, not one per push
        return f"{self.prefix}:flush:cooldown"

    @property
    def flush_delay(self) -> str:
        # string with PX: set NX by the client that schedules a flush at the end of
        # analytics_max_delay; while it lives, every newer event is covered by that flush
        return f"{self.prefix}:flush:delay"

    @property
    def flush_requests(self) -> str:
        # hash: how many flushes the clients asked for, by kind (now, trailing, delayed)
        return f"{self.prefix}:flush:requests"

    @property
    def shard_counts(self) -> str:
        # set: every shard count K a producer has used with this prefix (read on the base prefix,
        # QueueKeys(prefix), never on a shard's). A shard's tag depends on K (see _shards), so the
        # drains visit the shards of every K recorded here until they are empty: changing K live
        # strands nothing. Not hash-tagged: a single-key command, it may live on any node.
        return f"{self.prefix}:shards:counts"

    @property
    def replication_fence(self) -> str:
        # string with PX: written right before WAIT, on the same connection. WAIT counts the
        # replicas holding the last write *of its own connection*; with a pool that may not be the
        # connection that pushed, so a fresh write in the shard's slot stands in for the push
        # (replication is in order: a replica holding the fence holds every earlier write)
        return f"{self.prefix}:events:replicated"
