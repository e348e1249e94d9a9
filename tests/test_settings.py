"""Settings from an injected environ: names, defaults, conversions, bad values, hidden secrets."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

import pytest
import redis.asyncio as aioredis

from analytics_sdk import AnalyticsClient, ConfigurationError, Settings, SyncAnalyticsClient
from analytics_sdk._exceptions import shorten
from analytics_sdk._settings import env_name, redact_url

SECRET = "s3cr3t-Pa55"

#: Every attribute and a non-default value as the environment would spell it, with the parsed value.
SAMPLES: dict[str, tuple[str, object]] = {
    "redis_host": ("redis.internal", "redis.internal"),
    "redis_port": ("6380", 6380),
    "redis_password": (SECRET, SECRET),
    "redis_db": ("3", 3),
    "redis_url": ("redis://cache:6390/0", "redis://cache:6390/0"),
    "database_url": ("postgresql://app@db:5432/events", "postgresql://app@db:5432/events"),
    "broker_url": ("redis://broker:6379/9", "redis://broker:6379/9"),
    "analytics_batch_size": ("250", 250),
    "analytics_flush_interval": ("2.5", 2.5),
    "analytics_max_queue_size": ("5000", 5000),
    "analytics_key_prefix": ("{myapp}", "{myapp}"),
    "analytics_max_metadata_bytes": ("1024", 1024),
    "analytics_visibility_timeout": ("1200", 1200.0),
    "analytics_insert_batch_size": ("2000", 2000),
    "analytics_task_time_limit": ("700", 700.0),
    "analytics_task_soft_time_limit": ("650", 650.0),
    "analytics_drain_time_budget": ("120", 120.0),
    "analytics_backlog_trigger": ("off", False),
    "analytics_backlog_trigger_cooldown": ("0.5", 0.5),
    "analytics_max_delay": ("0", 0.0),
    "analytics_redis_timeout": ("1.5", 1.5),
    "analytics_publish_retries": ("0", 0),
    "analytics_publish_timeout": ("0.75", 0.75),
    "analytics_enabled": ("false", False),
    "analytics_queue_shards": ("6", 6),
    "analytics_redis_cluster": ("true", True),
    "analytics_redis_cluster_nodes": ("10.0.0.2:7001,[::1]:7002", "10.0.0.2:7001,[::1]:7002"),
    "analytics_replica_acks": ("1", 1),
    "analytics_replica_ack_timeout": ("0.5", 0.5),
    "analytics_partition_interval": ("day", "day"),
    "analytics_retention_days": ("365", 365),
}


def test_samples_cover_every_attribute() -> None:
    assert set(SAMPLES) == {f.name for f in dataclasses.fields(Settings)}


def test_variable_names() -> None:
    names = {f.name: env_name(f.name) for f in dataclasses.fields(Settings)}
    assert names == {
        "redis_host": "ANALYTICS_REDIS_HOST",
        "redis_port": "ANALYTICS_REDIS_PORT",
        "redis_password": "ANALYTICS_REDIS_PASSWORD",
        "redis_db": "ANALYTICS_REDIS_DB",
        "redis_url": "ANALYTICS_REDIS_URL",
        "database_url": "ANALYTICS_DATABASE_URL",
        "broker_url": "ANALYTICS_BROKER_URL",
        "analytics_batch_size": "ANALYTICS_BATCH_SIZE",
        "analytics_flush_interval": "ANALYTICS_FLUSH_INTERVAL",
        "analytics_max_queue_size": "ANALYTICS_MAX_QUEUE_SIZE",
        "analytics_key_prefix": "ANALYTICS_KEY_PREFIX",
        "analytics_max_metadata_bytes": "ANALYTICS_MAX_METADATA_BYTES",
        "analytics_visibility_timeout": "ANALYTICS_VISIBILITY_TIMEOUT",
        "analytics_insert_batch_size": "ANALYTICS_INSERT_BATCH_SIZE",
        "analytics_task_time_limit": "ANALYTICS_TASK_TIME_LIMIT",
        "analytics_task_soft_time_limit": "ANALYTICS_TASK_SOFT_TIME_LIMIT",
        "analytics_drain_time_budget": "ANALYTICS_DRAIN_TIME_BUDGET",
        "analytics_backlog_trigger": "ANALYTICS_BACKLOG_TRIGGER",
        "analytics_backlog_trigger_cooldown": "ANALYTICS_BACKLOG_TRIGGER_COOLDOWN",
        "analytics_max_delay": "ANALYTICS_MAX_DELAY",
        "analytics_redis_timeout": "ANALYTICS_REDIS_TIMEOUT",
        "analytics_publish_retries": "ANALYTICS_PUBLISH_RETRIES",
        "analytics_publish_timeout": "ANALYTICS_PUBLISH_TIMEOUT",
        "analytics_enabled": "ANALYTICS_ENABLED",
        "analytics_queue_shards": "ANALYTICS_QUEUE_SHARDS",
        "analytics_redis_cluster": "ANALYTICS_REDIS_CLUSTER",
        "analytics_redis_cluster_nodes": "ANALYTICS_REDIS_CLUSTER_NODES",
        "analytics_replica_acks": "ANALYTICS_REPLICA_ACKS",
        "analytics_replica_ack_timeout": "ANALYTICS_REPLICA_ACK_TIMEOUT",
        "analytics_partition_interval": "ANALYTICS_PARTITION_INTERVAL",
        "analytics_retention_days": "ANALYTICS_RETENTION_DAYS",
    }


def test_defaults() -> None:
    settings = Settings.from_env({})
    assert settings == Settings()
    assert settings.redis_host == "127.0.0.1"
    assert settings.redis_port == 6379
    assert settings.redis_password is None
    assert settings.redis_db == 0
    assert settings.redis_url is None
    assert settings.database_url.startswith("postgresql://")
    assert settings.broker_url is None
    assert settings.analytics_batch_size == 100
    assert settings.analytics_flush_interval == 60.0
    assert settings.analytics_max_queue_size == 1_000_000
    assert settings.analytics_key_prefix == "analytics"
    assert settings.analytics_max_metadata_bytes == 32 * 1024
    assert settings.analytics_visibility_timeout == 60.0
    # the worker's start-up check: room for the lease heartbeat, and soft before hard time limit
    assert settings.analytics_visibility_timeout >= 2 * settings.analytics_redis_timeout
    assert settings.analytics_task_soft_time_limit < settings.analytics_task_time_limit
    assert settings.redis_dsn == "redis://127.0.0.1:6379/0"
    assert settings.broker_dsn == settings.redis_dsn


@pytest.mark.parametrize("attribute", sorted(SAMPLES))
def test_every_variable_is_read(attribute: str) -> None:
    raw, parsed = SAMPLES[attribute]
    settings = Settings.from_env({env_name(attribute): raw, "UNRELATED": "x", "ANALYTICS_UNKNOWN": "y"})
    assert getattr(settings, attribute) == parsed
    assert type(getattr(settings, attribute)) is type(parsed)
    changed = {
        f.name
        for f in dataclasses.fields(Settings)
        if getattr(settings, f.name) != getattr(Settings(), f.name)
    }
    assert changed == {attribute}


def test_all_variables_at_once() -> None:
    environ = {env_name(name): raw for name, (raw, _) in SAMPLES.items()}
    settings = Settings.from_env(environ)
    for name, (_, parsed) in SAMPLES.items():
        assert getattr(settings, name) == parsed, name


def test_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ANALYTICS_BATCH_SIZE", "77")
    monkeypatch.setenv("ANALYTICS_KEY_PREFIX", "from-os")
    settings = Settings.from_env()
    assert settings.analytics_batch_size == 77
    assert settings.analytics_key_prefix == "from-os"
    assert AnalyticsClient.from_env().settings.analytics_batch_size == 77
    assert SyncAnalyticsClient.from_env().settings.analytics_key_prefix == "from-os"


def test_empty_variable_means_default_and_overrides_win() -> None:
    settings = Settings.from_env(
        {"ANALYTICS_BATCH_SIZE": "", "ANALYTICS_REDIS_PORT": "6390"}, redis_port=6391
    )
    assert settings.analytics_batch_size == 100
    assert settings.redis_port == 6391


@pytest.mark.parametrize(
    ("bool_text", "expected"),
    [
        ("1", True),
        ("true", True),
        ("Yes", True),
        (" ON ", True),
        ("0", False),
        ("FALSE", False),
        ("no", False),
    ],
)
def test_boolean_spellings(bool_text: str, expected: bool) -> None:
    assert Settings.from_env({"ANALYTICS_BACKLOG_TRIGGER": bool_text}).analytics_backlog_trigger is expected


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ANALYTICS_REDIS_PORT", "abc"),
        ("ANALYTICS_REDIS_PORT", "0"),
        ("ANALYTICS_REDIS_PORT", "70000"),
        ("ANALYTICS_REDIS_PORT", "6379.5"),
        ("ANALYTICS_REDIS_DB", "-1"),
        ("ANALYTICS_REDIS_DB", "one"),
        ("ANALYTICS_BATCH_SIZE", "0"),
        ("ANALYTICS_BATCH_SIZE", "-5"),
        ("ANALYTICS_BATCH_SIZE", "1e3"),
        ("ANALYTICS_BATCH_SIZE", "20000"),
        ("ANALYTICS_FLUSH_INTERVAL", "soon"),
        ("ANALYTICS_FLUSH_INTERVAL", "0"),
        ("ANALYTICS_FLUSH_INTERVAL", "nan"),
        ("ANALYTICS_VISIBILITY_TIMEOUT", "inf"),
        ("ANALYTICS_VISIBILITY_TIMEOUT", "-1"),
        ("ANALYTICS_MAX_QUEUE_SIZE", "0"),
        ("ANALYTICS_MAX_QUEUE_SIZE", "lots"),
        ("ANALYTICS_MAX_METADATA_BYTES", "32KiB"),
        ("ANALYTICS_KEY_PREFIX", "has space"),
        ("ANALYTICS_KEY_PREFIX", " "),
        ("ANALYTICS_BACKLOG_TRIGGER", "maybe"),
        ("ANALYTICS_BACKLOG_TRIGGER_COOLDOWN", "-0.1"),
        ("ANALYTICS_MAX_DELAY", "-1"),
        ("ANALYTICS_MAX_DELAY", "nan"),
        ("ANALYTICS_PUBLISH_RETRIES", "-1"),
        ("ANALYTICS_PUBLISH_RETRIES", "2.5"),
        ("ANALYTICS_REDIS_TIMEOUT", "0"),
        ("ANALYTICS_PUBLISH_TIMEOUT", "0"),
        ("ANALYTICS_PUBLISH_TIMEOUT", "inf"),
        ("ANALYTICS_PUBLISH_TIMEOUT", "soon"),
        ("ANALYTICS_INSERT_BATCH_SIZE", "0"),
        ("ANALYTICS_TASK_TIME_LIMIT", "x"),
        ("ANALYTICS_DRAIN_TIME_BUDGET", "0"),
        ("ANALYTICS_REDIS_URL", "http://cache:6379/0"),
        ("ANALYTICS_REDIS_URL", "cache:6379"),
        ("ANALYTICS_REDIS_URL", "redis://cache:port/0"),
        ("ANALYTICS_DATABASE_URL", "mysql://db/events"),
    ],
)
def test_bad_value_names_variable_and_value(variable: str, value: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({variable: value})
    exc = info.value
    assert isinstance(exc, ValueError)
    assert exc.variable == variable
    # The value shown is the one given: as written, or as parsed when parsing succeeded and the
    # check after it failed ("0" -> 0). Compared whole, so " " must show as ' ', not as nothing.
    given = {repr(value)}
    for parse in (int, float):
        with contextlib.suppress(ValueError):
            given.add(repr(parse(value)))
    assert repr(exc.value) in given, (exc.value, value)
    assert str(exc) == f"{variable}={shorten(exc.value)}: {exc.reason}"


@pytest.mark.parametrize(
    "changes",
    [
        {"redis_port": "6379"},
        {"analytics_batch_size": 1.5},
        {"analytics_backlog_trigger": 1},
        {"redis_db": True},
        {"analytics_key_prefix": ""},
        {"analytics_flush_interval": float("nan")},
    ],
)
def test_bad_value_in_constructor_and_replace(changes: dict[str, Any]) -> None:
    (name,) = changes
    with pytest.raises(ConfigurationError) as info:
        Settings(**changes)
    assert info.value.variable == env_name(name)
    with pytest.raises(ConfigurationError):
        Settings().replace(**changes)


def test_ints_accepted_for_floats() -> None:
    settings = Settings(analytics_flush_interval=5)
    assert settings.analytics_flush_interval == 5.0
    assert type(settings.analytics_flush_interval) is float


def test_frozen() -> None:
    settings = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.redis_port = 1  # type: ignore[misc]


def test_redis_url_overrides_host_port_password_db() -> None:
    settings = Settings.from_env(
        {
            "ANALYTICS_REDIS_HOST": "ignored-host",
            "ANALYTICS_REDIS_PORT": "1111",
            "ANALYTICS_REDIS_PASSWORD": "ignored",
            "ANALYTICS_REDIS_DB": "4",
            "ANALYTICS_REDIS_URL": "redis://cache.internal:6390/2",
        }
    )
    assert settings.redis_dsn == "redis://cache.internal:6390/2"
    assert settings.broker_dsn == "redis://cache.internal:6390/2"


def test_redis_dsn_built_from_parts() -> None:
    settings = Settings(redis_host="cache", redis_port=6390, redis_password="p@ss:w/rd", redis_db=5)
    assert settings.redis_dsn == "redis://:p%40ss%3Aw%2Frd@cache:6390/5"
    client = aioredis.Redis.from_url(settings.redis_dsn)
    kwargs = client.connection_pool.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["password"], kwargs["db"]) == (
        "cache",
        6390,
        "p@ss:w/rd",
        5,
    )
    assert Settings(redis_host="::1").redis_dsn == "redis://[::1]:6379/0"


def test_broker_url_defaults_to_redis_and_can_differ() -> None:
    assert Settings(redis_url="redis://a:1/0").broker_dsn == "redis://a:1/0"
    assert Settings(redis_url="redis://a:1/0", broker_url="amqp://mq//").broker_dsn == "amqp://mq//"


async def test_rediss_means_tls() -> None:
    settings = Settings.from_env({"ANALYTICS_REDIS_URL": f"rediss://:{SECRET}@cache.example:6380/0"})
    assert settings.redis_dsn.startswith("rediss://")
    client = AnalyticsClient(settings)
    try:
        redis = client._get_redis()  # built lazily, not connected yet
        assert issubclass(redis.connection_pool.connection_class, aioredis.SSLConnection)
    finally:
        await client.aclose()


# -- secrets -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        Settings(redis_password=SECRET),
        Settings(redis_url=f"redis://:{SECRET}@cache:6379/0"),
        Settings(redis_url=f"rediss://user:{SECRET}@cache:6379/0"),
        Settings(redis_url=f"redis://cache:6379/0?password={SECRET}"),
        Settings(broker_url=f"amqp://guest:{SECRET}@mq:5672//"),
        Settings(database_url=f"postgresql://app:{SECRET}@db:5432/events"),
        Settings.from_env({"ANALYTICS_REDIS_PASSWORD": SECRET}),
    ],
)
def test_password_never_in_repr_or_str(settings: Settings) -> None:
    for text in (repr(settings), str(settings), f"{settings}", repr(AnalyticsClient(settings))):
        assert SECRET not in text
    assert "***" in repr(settings)
    assert SECRET not in repr(SyncAnalyticsClient(settings))


def test_password_not_in_configuration_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"ANALYTICS_REDIS_URL": f"http://user:{SECRET}@cache:6379/0"})
    assert SECRET not in str(info.value)
    assert SECRET not in repr(info.value.value)
    with pytest.raises(ConfigurationError) as info:
        Settings.from_env({"ANALYTICS_REDIS_URL": f"redis://:{SECRET}@cache:port/0"})
    assert SECRET not in str(info.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (None, None),
        ("", ""),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        (f"redis://:{SECRET}@cache:6379/0", "redis://:***@cache:6379/0"),
        (f"redis://user:{SECRET}@[::1]:6379/1", "redis://user:***@[::1]:6379/1"),
        (
            f"postgresql://app:{SECRET}@db/events?sslmode=require",
            "postgresql://app:***@db/events?sslmode=require",
        ),
        (f"redis://cache/0?password={SECRET}&db=1", "redis://cache/0?password=***&db=1"),
        (f"redis://:{SECRET}@cache:notaport/0", "redis://:***@cache:notaport/0"),
    ],
)
def test_redact_url(url: str | None, shown: str | None) -> None:
    assert redact_url(url) == shown


def test_wrong_type_error_does_not_show_the_secret() -> None:
    with pytest.raises(ConfigurationError) as info:
        Settings(redis_password=12345)  # type: ignore[arg-type]
    assert "12345" not in str(info.value) and "ANALYTICS_REDIS_PASSWORD" in str(info.value)
    with pytest.raises(ConfigurationError) as info:
        Settings(database_url=b"postgresql://u:hunter2@h/db")  # type: ignore[arg-type]
    assert "hunter2" not in str(info.value)


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("ANALYTICS_PARTITION_INTERVAL", "year"),
        ("ANALYTICS_RETENTION_DAYS", "-1"),
        ("ANALYTICS_QUEUE_SHARDS", "0"),
        ("ANALYTICS_QUEUE_SHARDS", "1025"),
        ("ANALYTICS_REPLICA_ACKS", "-1"),
        ("ANALYTICS_REDIS_CLUSTER_NODES", "10.0.0.2"),
        ("ANALYTICS_REDIS_CLUSTER_NODES", "10.0.0.2:http"),
    ],
)
def test_partition_and_shard_settings_refuse_bad_values_naming_the_variable(
    variable: str, value: str
) -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env({variable: value})
    assert variable in str(caught.value)
    assert value in str(caught.value)


def test_cluster_refuses_a_database_other_than_0_naming_the_url() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(
            {"ANALYTICS_REDIS_CLUSTER": "true", "ANALYTICS_REDIS_URL": "redis://:s3cret@h:7000/2"}
        )
    assert "ANALYTICS_REDIS_URL" in str(caught.value)
    assert "database 0" in str(caught.value)
    assert "s3cret" not in str(caught.value)
    ok = Settings.from_env({"ANALYTICS_REDIS_CLUSTER": "true", "ANALYTICS_REDIS_URL": "redis://h:7000/0"})
    assert ok.analytics_redis_cluster


def test_replica_ack_timeout_must_be_below_the_redis_timeout() -> None:
    with pytest.raises(ConfigurationError) as caught:
        Settings.from_env(
            {
                "ANALYTICS_REPLICA_ACKS": "1",
                "ANALYTICS_REPLICA_ACK_TIMEOUT": "5",
                "ANALYTICS_REDIS_TIMEOUT": "5",
            }
        )
    assert "ANALYTICS_REPLICA_ACK_TIMEOUT" in str(caught.value)


def test_cluster_startup_nodes_parse_in_order() -> None:
    settings = Settings.from_env({"ANALYTICS_REDIS_CLUSTER_NODES": " 10.0.0.2:7001, [::1]:7002 ,"})
    assert settings.cluster_startup_nodes == (("10.0.0.2", 7001), ("::1", 7002))
