"""Load generator: ``coroutines`` concurrent track() loops in one process, recording every outcome.

Used in-process (``await produce(...)``) and as a subprocess (``python -m faults.producer JSON``) for
the scenarios that need several processes. Every event gets its event_id here, before the call, so a
refused event is known by id too. A call that takes longer than ``hang_after`` seconds counts as a
hang (the client promised an answer within its timeout and retries).
"""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass, field

import msgspec

from analytics_sdk import AnalyticsClient, PublishError, Settings
from analytics_sdk._event import new_event_id

__all__ = ["Production", "produce", "run_in_subprocess_args"]


@dataclass
class Production:
    accepted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    hung: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # anything but PublishError: a bug
    max_latency: float = 0.0

    def as_json(self) -> bytes:
        return msgspec.json.encode(self.__dict__)

    @classmethod
    def from_json(cls, raw: bytes) -> Production:
        return cls(**msgspec.json.decode(raw))


async def produce(
    settings: Settings,
    *,
    coroutines: int,
    events: int | None = None,
    duration: float | None = None,
    hang_after: float = 30.0,
    tag: str = "p",
) -> Production:
    """Each coroutine tracks ``events`` events, or keeps tracking for ``duration`` seconds."""
    out = Production()
    stop_at = time.monotonic() + duration if duration is not None else None

    async def loop(client: AnalyticsClient, number: int) -> None:
        i = 0
        while (events is None or i < events) and (stop_at is None or time.monotonic() < stop_at):
            event_id = new_event_id()
            started = time.monotonic()
            try:
                await asyncio.wait_for(
                    client.track("fault", event_id=event_id, user_id=f"{tag}-{number}",
                                 event_metadata={"c": number, "i": i}),
                    hang_after,
                )  # fmt: skip
                out.accepted.append(event_id)
            except PublishError:
                out.refused.append(event_id)
            except TimeoutError:
                out.hung.append(event_id)
                out.refused.append(event_id)
            except Exception as exc:
                out.errors.append(f"{type(exc).__name__}: {exc}")
                out.refused.append(event_id)
            out.max_latency = max(out.max_latency, time.monotonic() - started)
            i += 1
            if stop_at is not None:
                await asyncio.sleep(0)  # a duration-bound loop must not starve the others

    async with AnalyticsClient(settings) as client:
        await asyncio.gather(*(loop(client, n) for n in range(coroutines)))
    return out


def run_in_subprocess_args(settings: Settings, out_path: str, start_at: float, **kwargs: object) -> list[str]:
    """argv for ``python -m faults.producer``: settings travel as the few fields a producer uses."""
    spec = {
        "redis_url": settings.redis_dsn,
        "key_prefix": settings.analytics_key_prefix,
        "redis_timeout": settings.analytics_redis_timeout,
        "retries": settings.analytics_publish_retries,
        "cap": settings.analytics_max_queue_size,
        "out": out_path,
        "start_at": start_at,
        **kwargs,
    }
    return [sys.executable, "-m", "faults.producer", msgspec.json.encode(spec).decode()]


def _main(raw: str) -> None:
    spec = msgspec.json.decode(raw)
    settings = Settings(
        redis_url=spec["redis_url"],
        analytics_key_prefix=spec["key_prefix"],
        analytics_redis_timeout=spec["redis_timeout"],
        analytics_publish_retries=spec["retries"],
        analytics_max_queue_size=spec["cap"],
        analytics_backlog_trigger=False,
    )
    if spec.get("from_env"):  # the cluster scenarios: every ANALYTICS_* variable, as a worker gets them
        settings = Settings.from_env()
    # A common start time, so the processes really track at once (imports take uneven time).
    delay = spec["start_at"] - time.time()
    if 0 < delay < 30:
        time.sleep(delay)
    result = asyncio.run(
        produce(
            settings,
            coroutines=spec["coroutines"],
            events=spec.get("events"),
            duration=spec.get("duration"),
            hang_after=spec.get("hang_after", 30.0),
            tag=spec.get("tag", "p"),
        )
    )
    with open(spec["out"], "wb") as f:
        f.write(result.as_json())


if __name__ == "__main__":
    _main(sys.argv[1])
