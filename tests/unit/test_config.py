"""cachecoord.config.load: the example file, defaults, durations, every kind of
mistake (named by file and key), and CACHECOORD_* environment overrides.

Every case goes through a real TOML file on disk, as `cachecoord serve` reads it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from pathlib import Path

import pytest
from kubelet_env import service, service_links

from cachecoord.config import (
    ConfigError,
    Invalidation,
    Kind,
    NamespaceSettings,
    PostgresSettings,
    RedisSettings,
    ServerSettings,
    Settings,
    StrategyName,
    load,
)

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cachecoord.toml"

MANAGED = '[namespaces.x]\nkind = "managed"\n'


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / f"cachecoord-{uuid.uuid4().hex[:8]}.toml"
    if isinstance(text, str):
        path.write_text(text)
    else:
        path.write_bytes(text)
    return path


def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Settings:
    return load(write(tmp_path, text), environ or {})


def error_of(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> str:
    """Load *text* from a file, expect ConfigError, check it names the file."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ or {})
    message = str(info.value)
    assert str(path) in message, f"the file is not named in: {message}"
    return message


# -- what loads ---------------------------------------------------------------


def test_example_config_loads_with_its_namespaces() -> None:
    settings = load(EXAMPLE, {})
    assert settings.server.listen == "127.0.0.1:50051"
    assert settings.server.default_deadline == 5_000
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.postgres.url == "postgresql://postgres@127.0.0.1:5432/cachecoord"
    assert set(settings.namespaces) == {"users", "sessions", "views"}
    users = settings.namespaces["users"]
    assert users.name == "users"
    assert users.kind is Kind.MAPPED
    assert (users.table, users.key_column) == ("users", "id")
    assert users.strategy is StrategyName.CACHE_ASIDE
    assert users.ttl == 300_000
    assert users.ttl_jitter == pytest.approx(0.1)
    sessions = settings.namespaces["sessions"]
    assert sessions.kind is Kind.MANAGED
    assert sessions.strategy is StrategyName.WRITE_THROUGH
    assert sessions.ttl == 30 * 60_000
    assert (sessions.table, sessions.key_column) == ("", "")


def test_no_file_gives_the_documented_defaults() -> None:
    settings = load(None, {})
    assert settings == Settings()
    assert settings.server == ServerSettings()
    assert settings.server.listen == "127.0.0.1:50051"
    assert settings.server.shutdown_grace == 10_000
    assert settings.server.default_deadline == 5_000
    assert settings.server.max_key_bytes == 512
    assert settings.server.max_value_bytes == 1_048_576
    assert settings.server.max_batch_keys == 1000
    assert settings.redis == RedisSettings()
    assert settings.redis.url == "redis://127.0.0.1:6379/0"
    assert settings.postgres == PostgresSettings()
    assert dict(settings.namespaces) == {}


def test_empty_file_gives_the_defaults(tmp_path: Path) -> None:
    assert load_text(tmp_path, "") == Settings()


def test_settings_left_out_of_a_section_keep_their_defaults(tmp_path: Path) -> None:
    settings = load_text(tmp_path, '[server]\nlisten = "0.0.0.0:7000"\n')
    assert settings.server == ServerSettings(listen="0.0.0.0:7000")
    assert settings.redis == RedisSettings()


def test_namespace_settings_default_to_cache_aside_with_five_minute_ttl(tmp_path: Path) -> None:
    ns = load_text(tmp_path, MANAGED).namespaces["x"]
    assert ns == NamespaceSettings(name="x", kind=Kind.MANAGED)
    assert ns.strategy is StrategyName.CACHE_ASIDE
    assert ns.invalidation is Invalidation.DELETE
    assert ns.ttl == 300_000
    assert ns.ttl_jitter == pytest.approx(0.1)
    assert ns.negative_ttl == 30_000
    assert ns.lease == 3_000
    assert ns.lease_wait == 1_000


@pytest.mark.parametrize("strategy", list(StrategyName))
def test_every_strategy_is_accepted(tmp_path: Path, strategy: StrategyName) -> None:
    ns = load_text(tmp_path, f'{MANAGED}strategy = "{strategy}"\n').namespaces["x"]
    assert ns.strategy is strategy


@pytest.mark.parametrize("invalidation", list(Invalidation))
def test_every_invalidation_mode_is_accepted(tmp_path: Path, invalidation: Invalidation) -> None:
    ns = load_text(tmp_path, f'{MANAGED}invalidation = "{invalidation}"\n').namespaces["x"]
    assert ns.invalidation is invalidation


@pytest.mark.parametrize("name", ["a", "users", "user-profiles", "a_b-9", "z" * 63])
def test_valid_namespace_names_are_accepted(tmp_path: Path, name: str) -> None:
    assert set(load_text(tmp_path, f'[namespaces."{name}"]\nkind = "managed"\n').namespaces) == {
        name
    }


@pytest.mark.parametrize(
    "listen", ["127.0.0.1:50051", "0.0.0.0:0", "[::1]:50051", "[::]:7000", "cache.internal:443"]
)
def test_valid_listen_addresses_are_accepted(tmp_path: Path, listen: str) -> None:
    assert load_text(tmp_path, f'[server]\nlisten = "{listen}"\n').server.listen == listen


@pytest.mark.parametrize(
    "url", ["redis://127.0.0.1:6379/0", "rediss://cache:6380/1", "unix:///run/redis.sock"]
)
def test_valid_redis_urls_are_accepted(tmp_path: Path, url: str) -> None:
    assert load_text(tmp_path, f'[redis]\nurl = "{url}"\n').redis.url == url


# -- durations ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "ms"),
    [
        ('"250ms"', 250),
        ('"5s"', 5_000),
        ('"5m"', 300_000),
        ('"1h"', 3_600_000),
        ('"1.5s"', 1_500),
        ('"0.5h"', 1_800_000),
        ('" 5s "', 5_000),
        ('"7"', 7_000),
        ("5", 5_000),
        ("2.5", 2_500),
        ("0.25", 250),
    ],
)
def test_durations_are_read_as_milliseconds(tmp_path: Path, literal: str, ms: int) -> None:
    ns = load_text(tmp_path, f"{MANAGED}ttl = {literal}\n").namespaces["x"]
    assert ns.ttl == ms
    assert isinstance(ns.ttl, int)


@pytest.mark.parametrize(
    ("section", "key", "read"),
    [
        ("server", "shutdown_grace", lambda s: s.server.shutdown_grace),
        ("server", "default_deadline", lambda s: s.server.default_deadline),
        ("redis", "pool_timeout", lambda s: s.redis.pool_timeout),
        ("redis", "socket_timeout", lambda s: s.redis.socket_timeout),
        ("postgres", "outbox_interval", lambda s: s.postgres.outbox_interval),
        ("namespaces.x", "negative_ttl", lambda s: s.namespaces["x"].negative_ttl),
        ("namespaces.x", "lease", lambda s: s.namespaces["x"].lease),
        ("namespaces.x", "lease_wait", lambda s: s.namespaces["x"].lease_wait),
    ],
)
def test_every_duration_setting_takes_units(
    tmp_path: Path, section: str, key: str, read: Callable[[Settings], object]
) -> None:
    kind = 'kind = "managed"\n' if section.startswith("namespaces") else ""
    settings = load_text(tmp_path, f'[{section}]\n{kind}{key} = "1500ms"\n')
    assert read(settings) == 1_500
    settings = load_text(tmp_path, f"[{section}]\n{kind}{key} = 2\n")
    assert read(settings) == 2_000


@pytest.mark.parametrize(
    "literal",
    [
        '"5 minutes"',
        '"5d"',
        '"5S"',
        '"-1s"',
        '"ms"',
        '""',
        '"1e3"',
        '"5s5"',
        "-1",
        "-0.5",
        "true",
        "nan",
        "[5]",
        "{ s = 5 }",
    ],
)
def test_bad_duration_is_rejected_naming_the_key_and_the_accepted_forms(
    tmp_path: Path, literal: str
) -> None:
    message = error_of(tmp_path, f"{MANAGED}ttl = {literal}\n")
    assert "namespaces.x.ttl " in message
    assert '"250ms"' in message
    assert '"5m"' in message


def test_bad_duration_in_a_section_names_that_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[server]\ndefault_deadline = "soon"\n')
    assert "server.default_deadline" in message
    assert "'soon'" in message


@pytest.mark.parametrize(
    ("literal", "key"),
    [
        ('"0s"', "namespaces.x.ttl"),
        ("0", "namespaces.x.ttl"),
        ('"0.1ms"', "namespaces.x.ttl"),
    ],
)
def test_zero_ttl_is_rejected(tmp_path: Path, literal: str, key: str) -> None:
    message = error_of(tmp_path, f"{MANAGED}ttl = {literal}\n")
    assert key in message
    assert "positive" in message


def test_infinite_duration_is_a_config_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, f"{MANAGED}ttl = inf\n")
    assert "namespaces.x.ttl" in message


# -- mistakes in the file -----------------------------------------------------------


def test_mapped_namespace_without_table_names_the_table_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[namespaces.users]\nkind = "mapped"\nkey_column = "id"\n')
    assert "namespaces.users.table" in message
    assert "key_column" in message


def test_mapped_namespace_without_key_column_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[namespaces.users]\nkind = "mapped"\ntable = "users"\n')
    assert "namespaces.users.table" in message
    assert "key_column" in message


def test_managed_namespace_with_a_table_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, f'{MANAGED}table = "users"\n')
    assert "namespaces.x.table" in message
    assert "managed" in message


@pytest.mark.parametrize(
    "listen",
    [
        "localhost",
        "127.0.0.1",
        ":50051",
        "127.0.0.1:",
        "127.0.0.1:port",
        "127.0.0.1:123456",
        "127.0.0.1:50051 ",
        "host name:50051",
        "",
    ],
)
def test_bad_listen_address_names_server_listen(tmp_path: Path, listen: str) -> None:
    message = error_of(tmp_path, f'[server]\nlisten = "{listen}"\n')
    assert "server.listen" in message
    assert "host:port" in message


def test_listen_port_out_of_range_is_a_config_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[server]\nlisten = "127.0.0.1:99999"\n')
    assert "server.listen" in message


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "127.0.0.1:6379", "", "postgresql://x", "REDIS://x"]
)
def test_bad_redis_url_names_redis_url(tmp_path: Path, url: str) -> None:
    message = error_of(tmp_path, f'[redis]\nurl = "{url}"\n')
    assert "redis.url" in message
    assert "redis://" in message


@pytest.mark.parametrize("literal", ['"yes"', "1"])
def test_bad_sharded_pubsub_names_redis_sharded_pubsub(tmp_path: Path, literal: str) -> None:
    message = error_of(tmp_path, f"[redis]\ncluster = true\nsharded_pubsub = {literal}\n")
    assert "redis.sharded_pubsub" in message


def test_sharded_pubsub_is_on_for_a_cluster_only_and_can_be_turned_off(tmp_path: Path) -> None:
    assert not load_text(tmp_path, "").redis.sharded
    assert load_text(tmp_path, "[redis]\ncluster = true\n").redis.sharded
    off = load_text(tmp_path, "[redis]\ncluster = true\nsharded_pubsub = false\n")
    assert not off.redis.sharded


def test_namespace_without_kind_names_its_kind_key(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[namespaces.x]\nttl = "5m"\n')
    assert "namespaces.x.kind" in message
    assert '"mapped"' in message
    assert '"managed"' in message


@pytest.mark.parametrize("literal", ['"weird"', '"MANAGED"', '""', "1", "true"])
def test_bad_kind_lists_the_allowed_kinds(tmp_path: Path, literal: str) -> None:
    message = error_of(tmp_path, f"[namespaces.x]\nkind = {literal}\n")
    assert "namespaces.x.kind" in message
    assert "'mapped'" in message
    assert "'managed'" in message


def test_bad_strategy_lists_the_allowed_strategies(tmp_path: Path) -> None:
    message = error_of(tmp_path, f'{MANAGED}strategy = "write-around"\n')
    assert "namespaces.x.strategy" in message
    assert "'write-around'" in message
    for allowed in ("'cache-aside'", "'write-through'", "'write-behind'"):
        assert allowed in message


def test_bad_invalidation_mode_lists_the_allowed_modes(tmp_path: Path) -> None:
    message = error_of(tmp_path, f'{MANAGED}invalidation = "expire"\n')
    assert "namespaces.x.invalidation" in message
    assert "'delete'" in message
    assert "'version'" in message


@pytest.mark.parametrize(
    ("text", "key", "known"),
    [
        ('[server]\nlisen = "127.0.0.1:1"\n', "server.lisen", "listen"),
        ('[redis]\nuri = "redis://x"\n', "redis.uri", "url"),
        ('[postgres]\ndsn = "postgresql://x"\n', "postgres.dsn", "url"),
        (f"{MANAGED}ttl_jiter = 0.1\n", "namespaces.x.ttl_jiter", "ttl_jitter"),
        (f"{MANAGED}[namespaces.x.near]\nmax = 1\n", "namespaces.x.near", "ttl"),
    ],
)
def test_unknown_key_names_the_key_and_lists_the_known_ones(
    tmp_path: Path, text: str, key: str, known: str
) -> None:
    message = error_of(tmp_path, text)
    assert f"unknown key {key}" in message
    assert known in message


def test_name_key_inside_a_namespace_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, f'{MANAGED}name = "other"\n')
    assert "namespaces.x.name" in message


@pytest.mark.parametrize(
    ("text", "section"),
    [
        ('[serverr]\nlisten = "127.0.0.1:1"\n', "[serverr]"),
        ('[namespace.x]\nkind = "managed"\n', "[namespace]"),
        ('listen = "127.0.0.1:1"\n', "[listen]"),
    ],
)
def test_unknown_section_is_named_with_the_known_sections(
    tmp_path: Path, text: str, section: str
) -> None:
    message = error_of(tmp_path, text)
    assert f"unknown section {section}" in message
    for known in ("server", "redis", "postgres", "namespaces"):
        assert known in message


@pytest.mark.parametrize("literal", ['"127.0.0.1:1"', "5"])
def test_section_that_is_not_a_table_is_a_config_error(tmp_path: Path, literal: str) -> None:
    message = error_of(tmp_path, f"server = {literal}\n")
    assert "server" in message


def test_namespaces_that_is_not_a_table_is_rejected(tmp_path: Path) -> None:
    assert "[namespaces]" in error_of(tmp_path, "namespaces = 5\n")
    assert "[namespaces.x]" in error_of(tmp_path, "[namespaces]\nx = 5\n")


@pytest.mark.parametrize(
    ("literal", "key"),
    [
        ("0.6", "namespaces.x.ttl_jitter"),
        ("-0.1", "namespaces.x.ttl_jitter"),
        ("1", "namespaces.x.ttl_jitter"),
        ("nan", "namespaces.x.ttl_jitter"),
    ],
)
def test_jitter_out_of_range_is_rejected(tmp_path: Path, literal: str, key: str) -> None:
    message = error_of(tmp_path, f"{MANAGED}ttl_jitter = {literal}\n")
    assert key in message
    assert "0.5" in message


@pytest.mark.parametrize("jitter", [0, 0.5, 0.25])
def test_jitter_bounds_are_inclusive(tmp_path: Path, jitter: float) -> None:
    ns = load_text(tmp_path, f"{MANAGED}ttl_jitter = {jitter}\n").namespaces["x"]
    assert ns.ttl_jitter == jitter


@pytest.mark.parametrize(
    "name", ["Users", "1abc", "_a", "-a", "a:b", "a b", "a.b", "a{b}", "a*", "ü", "", "z" * 64]
)
def test_invalid_namespace_name_is_rejected(tmp_path: Path, name: str) -> None:
    message = error_of(tmp_path, f'[namespaces."{name}"]\nkind = "managed"\n')
    assert f"namespaces.{name}" in message
    assert "a-z" in message


def test_namespace_name_with_trailing_newline_is_rejected(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[namespaces."bad\\n"]\nkind = "managed"\n')
    assert "a-z" in message


@pytest.mark.parametrize(
    ("text", "key", "hint"),
    [
        ('[server]\nmax_key_bytes = "lots"\n', "server.max_key_bytes", "an integer"),
        ("[server]\nmax_key_bytes = true\n", "server.max_key_bytes", "an integer"),
        ("[server]\nmax_key_bytes = 1.5\n", "server.max_key_bytes", "an integer"),
        ("[server]\nlisten = 50051\n", "server.listen", "a string"),
        ("[redis]\nurl = true\n", "redis.url", "a string"),
        ("[postgres]\nmax_connections = [1]\n", "postgres.max_connections", "an integer"),
        (f'{MANAGED}ttl_jitter = "some"\n', "namespaces.x.ttl_jitter", "a number"),
        (f"{MANAGED}ttl_jitter = false\n", "namespaces.x.ttl_jitter", "a number"),
    ],
)
def test_value_of_the_wrong_type_names_the_key_and_the_expected_type(
    tmp_path: Path, text: str, key: str, hint: str
) -> None:
    message = error_of(tmp_path, text)
    assert key in message
    assert hint in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[server]\nmax_key_bytes = 0\n", "server.max_key_bytes"),
        ("[server]\nmax_key_bytes = 65537\n", "server.max_key_bytes"),
        ("[server]\nmax_value_bytes = 0\n", "server.max_value_bytes"),
        ("[server]\nmax_value_bytes = 67108865\n", "server.max_value_bytes"),
        ("[server]\nmax_batch_keys = 0\n", "server.max_batch_keys"),
        ('[server]\ndefault_deadline = "0s"\n', "server.default_deadline"),
        ("[redis]\nmax_connections = 0\n", "redis.max_connections"),
        ("[postgres]\nmin_connections = 11\nmax_connections = 10\n", "postgres.max_connections"),
        ("[postgres]\nmin_connections = -1\n", "postgres.max_connections"),
        ("[postgres]\nmax_connections = 0\nmin_connections = 0\n", "postgres.max_connections"),
        ("[postgres]\nprepare_threshold = -2\n", "postgres.prepare_threshold"),
        (f'{MANAGED}lease = "0s"\n', "namespaces.x.lease"),
    ],
)
def test_number_out_of_range_names_its_key(tmp_path: Path, text: str, key: str) -> None:
    assert key in error_of(tmp_path, text)


def test_toml_syntax_error_names_the_file_and_the_line(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[server]\nlisten = "127.0.0.1:1\n')
    assert "TOML" in message
    assert "line 2" in message


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[server]\nlisten = "a:1"\nlisten = "b:2"\n')
    assert "TOML" in message


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere" / "cachecoord.toml"
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(path) in str(info.value)
    assert "not found" in str(info.value)


def test_directory_instead_of_a_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, {})
    assert str(tmp_path) in str(info.value)


def test_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = write(tmp_path, b'[server]\nlisten = "\xe9:1"\n')
    with pytest.raises(ConfigError) as info:
        load(path, {})
    assert str(path) in str(info.value)


# -- environment overrides ----------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "read"),
    [
        ("CACHECOORD_REDIS_URL", "redis://cache:6380/3", lambda s: s.redis.url),
        ("CACHECOORD_POSTGRES_URL", "postgresql://app@db/prod", lambda s: s.postgres.url),
        ("CACHECOORD_DATABASE_URL", "postgresql://app@db/prod", lambda s: s.postgres.url),
        ("CACHECOORD_SERVER_LISTEN", "0.0.0.0:6000", lambda s: s.server.listen),
        ("CACHECOORD_SERVER_INSTANCE_ID", "pod-7", lambda s: s.server.instance_id),
    ],
)
def test_environment_overrides_the_file(
    var: str, value: str, read: Callable[[Settings], object]
) -> None:
    assert read(load(EXAMPLE, {var: value})) == value
    assert read(load(None, {var: value})) == value


def test_environment_values_are_coerced_to_the_setting_type() -> None:
    settings = load(
        EXAMPLE,
        {
            "CACHECOORD_SERVER_MAX_KEY_BYTES": "100",
            "CACHECOORD_SERVER_DEFAULT_DEADLINE": "250ms",
            "CACHECOORD_REDIS_SOCKET_TIMEOUT": "2",
            "CACHECOORD_POSTGRES_PREPARE_THRESHOLD": "-1",
        },
    )
    assert settings.server.max_key_bytes == 100
    assert type(settings.server.max_key_bytes) is int
    assert settings.server.default_deadline == 250
    assert settings.redis.socket_timeout == 2_000
    assert settings.postgres.prepare_threshold == -1
    # The rest of the file still applies.
    assert set(settings.namespaces) == {"users", "sessions", "views"}


def test_environment_values_are_validated_like_the_file() -> None:
    with pytest.raises(ConfigError, match=r"server\.listen"):
        load(EXAMPLE, {"CACHECOORD_SERVER_LISTEN": "nonsense"})
    with pytest.raises(ConfigError, match=r"redis\.url"):
        load(EXAMPLE, {"CACHECOORD_REDIS_URL": "http://cache"})
    with pytest.raises(ConfigError, match=r"server\.max_key_bytes"):
        load(EXAMPLE, {"CACHECOORD_SERVER_MAX_KEY_BYTES": "0"})


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError) as info:
        load(EXAMPLE, {"CACHECOORD_SERVER_MAX_KEY_BYTES": "abc"})
    assert "CACHECOORD_SERVER_MAX_KEY_BYTES" in str(info.value)


@pytest.mark.parametrize(
    "var",
    [
        "CACHECOORD_FOO_BAR",
        "CACHECOORD_SERVER_PORT",
        "CACHECOORD_REDIS_URL_",
        "CACHECOORD_NAMESPACES_USERS_TTL",
        "CACHECOORD_",
    ],
)
def test_unknown_environment_variable_is_named(var: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(EXAMPLE, {var: "x"})
    assert var in str(info.value)
    assert "CACHECOORD_<SECTION>_<KEY>" in str(info.value)


def test_cachecoord_config_variable_is_not_a_setting() -> None:
    settings = load(EXAMPLE, {"CACHECOORD_CONFIG": "/etc/somewhere-else.toml"})
    assert settings == load(EXAMPLE, {})


def test_variables_without_the_prefix_are_ignored() -> None:
    environ = {"REDIS_URL": "http://x", "DATABASE_URL": "nonsense", "PATH": "/bin"}
    assert load(EXAMPLE, environ) == load(EXAMPLE, {})


def test_alias_and_canonical_variable_together_do_not_depend_on_order() -> None:
    canonical = {"CACHECOORD_POSTGRES_URL": "postgresql://canonical"}
    alias = {"CACHECOORD_DATABASE_URL": "postgresql://alias"}
    outcomes = []
    for environ in ({**canonical, **alias}, {**alias, **canonical}):
        try:
            outcomes.append(load(None, environ).postgres.url)
        except ConfigError as err:
            outcomes.append(f"error naming both: {'POSTGRES_URL' in str(err)}")
    assert outcomes[0] == outcomes[1]


# Kubernetes service links


def test_kubernetes_service_links_are_not_settings(tmp_path: Path) -> None:
    # What the kubelet injects for Services named cachecoord (the chart's own),
    # cachecoord-redis and cachecoord-postgres (a user's backends), IPv6 too.
    links = service_links(
        [
            service("cachecoord", 50051, cluster_ip="10.96.0.11"),
            service("cachecoord-redis", 6379, cluster_ip="fd00::6379"),
            service("cachecoord-postgres", 5432, 9187),
        ]
    )
    assert links["CACHECOORD_PORT"] == "tcp://10.96.0.11:50051"
    assert "CACHECOORD_REDIS_PORT_6379_TCP_ADDR" in links
    settings = load(write(tmp_path, MANAGED), {**links, "CACHECOORD_REDIS_URL": "redis://r:1/0"})
    assert settings.redis.url == "redis://r:1/0"
    assert settings.server == ServerSettings()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("CACHECOORD_SERVER_LISTN", "0.0.0.0:50051"),  # misspelt setting
        ("CACHECOORD_PORT", "50051"),  # not the shape the kubelet gives
        ("CACHECOORD_SERVICE_HOST", "cachecoord.default.svc"),
        ("CACHECOORD_PORT_50051_TCP_ADDR", "tcp://10.0.0.1:50051"),
        ("CACHECOORD_SERVER_PORT", "50051"),
    ],
)
def test_variables_shaped_unlike_service_links_are_still_refused(
    tmp_path: Path, var: str, value: str
) -> None:
    with pytest.raises(ConfigError, match=var):
        load(write(tmp_path, MANAGED), {var: value})


@pytest.mark.parametrize(
    ("line", "key"),
    [
        ("log_partitions = 0", "log_partitions"),
        ("log_partitions = 1025", "log_partitions"),
        ("log_max_entries = 0", "log_max_entries"),
        ('log_max_age = "0s"', "log_max_age"),
    ],
)
def test_invalidation_log_bounds_are_checked_naming_the_key(
    tmp_path: Path, line: str, key: str
) -> None:
    message = error_of(tmp_path, f'[namespaces.blobs]\nkind = "managed"\n{line}\n')
    assert f"namespaces.blobs.{key}" in message


def test_invalidation_log_defaults(tmp_path: Path) -> None:
    ns = load_text(tmp_path, '[namespaces.blobs]\nkind = "managed"\n').namespaces["blobs"]
    assert (ns.log_partitions, ns.log_max_entries, ns.log_max_age) == (8, 10_000, 600_000)
