"""cachecoord.config.load for [tls], [auth] and server.health_listen: what
loads, and every mistake stopping start-up with a message that names the
file and the key, and never a token.

Every case goes through a real TOML file on disk, as `cachecoord serve` reads it.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Mapping
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from tls_certs import Pki, make_pki

from cachecoord.config import Action, ConfigError, Settings, load

NAMESPACES = """
[namespaces.users]
kind = "mapped"
table = "users"
key_column = "id"

[namespaces.blobs]
kind = "managed"
"""
TOKEN = "s3cr3t-token-0123456789abcdef"
OTHER = "another-token-9876543210fedcba"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / f"cachecoord-{uuid.uuid4().hex[:8]}.toml"
    path.write_text(text + NAMESPACES)
    return path


def load_text(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> Settings:
    return load(write(tmp_path, text), environ or {})


def error_of(tmp_path: Path, text: str, environ: Mapping[str, str] | None = None) -> str:
    """Load *text*, expect ConfigError; check it names the file and quotes no token."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, environ or {})
    message = str(info.value)
    assert str(path) in message, f"the file is not named in: {message}"
    assert TOKEN not in message, f"a token leaked into: {message}"
    return message


def tls(pki: Pki, **override: str) -> str:
    files = {
        "cert_file": str(pki.server.cert_file),
        "key_file": str(pki.server.key_file),
        "client_ca_file": str(pki.ca.cert_file),
        **override,
    }
    return "[tls]\n" + "".join(f'{k} = "{v}"\n' for k, v in files.items() if v)


def auth(token: str, *, enabled: str = "true") -> str:
    """[auth] with one token entry (TOML lines of it in *token*)."""
    return f"[auth]\nenabled = {enabled}\n\n[[auth.tokens]]\n{token}\n"


READER = 'name = "reader"\ntoken_env = "READER_TOKEN"\npermissions = { users = ["read"] }'


# -- defaults and what loads --------------------------------------------------------


def test_security_is_off_by_default(tmp_path: Path) -> None:
    settings = load_text(tmp_path, "")
    assert not settings.tls.enabled
    assert not settings.auth.enabled
    assert settings.auth.tokens == ()
    assert settings.server.health_listen == ""


def test_tls_and_mtls_load(tmp_path: Path, pki: Pki) -> None:
    settings = load_text(tmp_path, tls(pki, client_ca_file=""))
    assert settings.tls.enabled
    assert settings.tls.cert_file == str(pki.server.cert_file)
    assert settings.tls.client_ca_file == ""
    mtls = load_text(tmp_path, tls(pki))
    assert mtls.tls.client_ca_file == str(pki.ca.cert_file)


def test_tls_files_come_from_the_environment(tmp_path: Path, pki: Pki) -> None:
    environ = {
        "CACHECOORD_TLS_CERT_FILE": str(pki.server.cert_file),
        "CACHECOORD_TLS_KEY_FILE": str(pki.server.key_file),
    }
    assert load_text(tmp_path, "", environ).tls.enabled


def test_health_listen_loads(tmp_path: Path) -> None:
    settings = load_text(tmp_path, '[server]\nhealth_listen = "0.0.0.0:50052"\n')
    assert settings.server.health_listen == "0.0.0.0:50052"


def test_tokens_from_file_and_environment_keep_only_a_digest(tmp_path: Path) -> None:
    token_file = tmp_path / "writer.token"
    token_file.write_text(f"  {OTHER}\n")
    text = (
        auth(READER)
        + f'\n[[auth.tokens]]\nname = "writer"\ntoken_file = "{token_file}"\n'
        + 'permissions = { "*" = ["*"] }\nlock_prefixes = ["report-", "batch-"]\n'
    )
    settings = load_text(tmp_path, text, {"READER_TOKEN": TOKEN})

    reader, writer = settings.auth.tokens
    assert settings.auth.enabled
    assert reader.name == "reader"
    assert reader.permissions == {"users": frozenset({Action.READ})}
    assert reader.digest == hashlib.sha256(TOKEN.encode()).digest()
    assert writer.digest == hashlib.sha256(OTHER.encode()).digest()  # trimmed
    assert writer.permissions == {
        "*": frozenset({Action.READ, Action.WRITE, Action.INVALIDATE, Action.WATCH})
    }
    assert writer.lock_prefixes == ("report-", "batch-")
    assert TOKEN not in repr(settings)
    assert OTHER not in repr(settings)


def test_a_token_variable_may_be_called_cachecoord_something(tmp_path: Path) -> None:
    """CACHECOORD_* variables are settings, except the ones tokens are read from."""
    text = auth(READER.replace("READER_TOKEN", "CACHECOORD_READER_TOKEN"))
    settings = load_text(tmp_path, text, {"CACHECOORD_READER_TOKEN": TOKEN})
    assert settings.auth.tokens[0].digest


def test_disabled_auth_does_not_read_its_tokens(tmp_path: Path) -> None:
    settings = load_text(tmp_path, auth(READER, enabled="false"))
    assert not settings.auth.enabled
    assert settings.auth.tokens[0].digest == b""


def test_lock_only_token_loads(tmp_path: Path) -> None:
    token = 'name = "ops"\ntoken_env = "T"\nlock_prefixes = ["*"]'
    settings = load_text(tmp_path, auth(token), {"T": TOKEN})
    assert settings.auth.tokens[0].lock_prefixes == ("*",)
    assert settings.auth.tokens[0].permissions == {}


# -- [tls] mistakes ---------------------------------------------------------------------


def test_cert_without_key(tmp_path: Path, pki: Pki) -> None:
    message = error_of(tmp_path, tls(pki, key_file="", client_ca_file=""))
    assert "tls.key_file" in message


def test_key_without_cert(tmp_path: Path, pki: Pki) -> None:
    message = error_of(tmp_path, tls(pki, cert_file="", client_ca_file=""))
    assert "tls.cert_file" in message


def test_client_ca_without_tls(tmp_path: Path, pki: Pki) -> None:
    message = error_of(tmp_path, tls(pki, cert_file="", key_file=""))
    assert "tls.client_ca_file" in message


@pytest.mark.parametrize("key", ["cert_file", "key_file", "client_ca_file"])
def test_missing_tls_file_is_named_with_its_key(tmp_path: Path, pki: Pki, key: str) -> None:
    missing = tmp_path / "nowhere.pem"
    message = error_of(tmp_path, tls(pki, **{key: str(missing)}))
    assert f"tls.{key}" in message
    assert str(missing) in message
    assert "does not exist" in message


def test_tls_file_that_is_a_directory(tmp_path: Path, pki: Pki) -> None:
    message = error_of(tmp_path, tls(pki, cert_file=str(tmp_path)))
    assert "tls.cert_file" in message
    assert "directory" in message


def test_swapped_cert_and_key(tmp_path: Path, pki: Pki) -> None:
    swapped = tls(pki, cert_file=str(pki.server.key_file), key_file=str(pki.server.cert_file))
    message = error_of(tmp_path, swapped)
    assert "tls.cert_file" in message
    assert "certificate" in message


def test_key_of_another_certificate(tmp_path: Path, pki: Pki) -> None:
    message = error_of(tmp_path, tls(pki, key_file=str(pki.client.key_file)))
    assert "tls.key_file" in message
    assert "not the private key" in message


def test_encrypted_key(tmp_path: Path, pki: Pki) -> None:
    key = serialization.load_pem_private_key(pki.server.key, password=None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    )
    message = error_of(tmp_path, tls(pki, key_file=str(encrypted)))
    assert "tls.key_file" in message
    assert "encrypted" in message


def test_client_ca_that_is_not_a_certificate(tmp_path: Path, pki: Pki) -> None:
    message = error_of(tmp_path, tls(pki, client_ca_file=str(pki.client.key_file)))
    assert "tls.client_ca_file" in message


def test_garbage_certificate(tmp_path: Path, pki: Pki) -> None:
    garbage = tmp_path / "garbage.crt"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    message = error_of(tmp_path, tls(pki, cert_file=str(garbage)))
    assert "tls.cert_file" in message
    assert "cannot be parsed" in message


# -- server.health_listen mistakes ----------------------------------------------------------


def test_health_listen_not_host_port(tmp_path: Path) -> None:
    message = error_of(tmp_path, '[server]\nhealth_listen = "50052"\n')
    assert "server.health_listen" in message


def test_health_listen_on_the_main_port(tmp_path: Path) -> None:
    text = '[server]\nlisten = "127.0.0.1:50051"\nhealth_listen = "127.0.0.1:50051"\n'
    assert "server.health_listen" in error_of(tmp_path, text)


# -- [auth] mistakes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "named"),
    [
        pytest.param("[auth]\nenable = true\n", "auth.enable", id="unknown-key"),
        pytest.param('[auth]\nenabled = "sure"\n', "auth.enabled", id="not-bool"),
        pytest.param('[auth]\ntokens = "x"\n', "[[auth.tokens]]", id="tokens-not-tables"),
        pytest.param("[auth]\nenabled = true\n", "auth.enabled", id="enabled-without-tokens"),
        pytest.param(
            auth('token_env = "T"\npermissions = { users = ["read"] }'),
            "auth.tokens[0].name",
            id="no-name",
        ),
        pytest.param(auth(READER.replace('"reader"', '"bad name!"')), ".name", id="bad-name"),
        pytest.param(
            auth('name = "x"\npermissions = { users = ["read"] }'),
            "auth.tokens[0].token_file",
            id="neither-file-nor-env",
        ),
        pytest.param(
            auth(READER + '\ntoken_file = "/t"'),
            "auth.tokens[0].token_file",
            id="both-file-and-env",
        ),
        pytest.param(
            auth(READER.replace("READER_TOKEN", "NOT A VAR")),
            "auth.tokens[0].token_env",
            id="bad-variable-name",
        ),
        pytest.param(auth(READER + '\ncolour = "red"'), "auth.tokens[0].colour", id="unknown"),
        pytest.param(
            auth(READER.replace("users", "userz")),
            "auth.tokens[0].permissions.userz",
            id="unknown-namespace",
        ),
        pytest.param(
            auth(READER.replace('"read"', '"reed"')),
            "auth.tokens[0].permissions.users",
            id="unknown-action",
        ),
        pytest.param(
            auth(READER.replace('"read"', '"lock"')),
            "lock_prefixes",
            id="lock-is-not-a-namespace-action",
        ),
        pytest.param(
            auth(READER.replace('["read"]', "[]")),
            "auth.tokens[0].permissions.users",
            id="no-actions",
        ),
        pytest.param(
            auth(READER.replace('{ users = ["read"] }', '["read"]')),
            "auth.tokens[0].permissions",
            id="permissions-not-a-table",
        ),
        pytest.param(
            auth(READER + '\nlock_prefixes = [""]'),
            "auth.tokens[0].lock_prefixes",
            id="empty-lock-prefix",
        ),
        pytest.param(
            auth('name = "x"\ntoken_env = "READER_TOKEN"'),
            "grants nothing",
            id="grants-nothing",
        ),
        pytest.param(
            auth(READER) + "\n[[auth.tokens]]\n" + READER.replace("READER_TOKEN", "T"),
            "auth.tokens[1].name",
            id="duplicate-name",
        ),
    ],
)
def test_auth_mistake_names_the_key(tmp_path: Path, text: str, named: str) -> None:
    message = error_of(tmp_path, text, {"READER_TOKEN": TOKEN, "T": OTHER})
    assert named in message


def test_unset_token_variable_is_named(tmp_path: Path) -> None:
    message = error_of(tmp_path, auth(READER))
    assert "auth.tokens[0].token_env" in message
    assert "READER_TOKEN is not set" in message


def test_empty_token_variable(tmp_path: Path) -> None:
    message = error_of(tmp_path, auth(READER), {"READER_TOKEN": "  "})
    assert "empty" in message


def test_missing_token_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.token"
    token = f'name = "x"\ntoken_file = "{missing}"\npermissions = {{ users = ["read"] }}'
    message = error_of(tmp_path, auth(token))
    assert "auth.tokens[0].token_file" in message
    assert str(missing) in message


def test_short_token_is_refused_without_quoting_it(tmp_path: Path) -> None:
    message = error_of(tmp_path, auth(READER), {"READER_TOKEN": "hunter2"})
    assert "too short" in message
    assert "hunter2" not in message


def test_token_with_spaces_is_refused_without_quoting_it(tmp_path: Path) -> None:
    spaced = "correct horse battery staple"
    message = error_of(tmp_path, auth(READER), {"READER_TOKEN": spaced})
    assert "without spaces" in message
    assert spaced not in message


def test_two_entries_with_one_token(tmp_path: Path) -> None:
    second = READER.replace('"reader"', '"again"').replace("READER_TOKEN", "T")
    text = auth(READER) + "\n[[auth.tokens]]\n" + second
    message = error_of(tmp_path, text, {"READER_TOKEN": TOKEN, "T": TOKEN})
    assert "'again' is the same token as 'reader'" in message


def test_the_readme_example_loads(tmp_path: Path, pki: Pki) -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme[readme.index("## Security") :]
    start = section.index("```toml\n") + len("```toml\n")
    example = section[start : section.index("```", start)]
    replaced = {
        "/etc/cachecoord/tls/server.crt": pki.server.cert_file,
        "/etc/cachecoord/tls/server.key": pki.server.key_file,
        "/etc/cachecoord/tls/clients-ca.crt": pki.ca.cert_file,
    }
    for name in ("profile-service", "ops"):
        replaced[f"/run/secrets/{name}-token"] = tmp_path / name
        (tmp_path / name).write_text(f"{name}-{TOKEN}\n")
    for old, new in replaced.items():
        assert old in example
        example = example.replace(old, str(new))
    path = tmp_path / "readme.toml"
    path.write_text(example + NAMESPACES + '\n[namespaces.sessions]\nkind = "managed"\n')

    settings = load(path, {"DASHBOARD_TOKEN": TOKEN, "REPORTS_TOKEN": OTHER})

    assert settings.tls.client_ca_file
    assert settings.server.health_listen == "0.0.0.0:50052"
    assert [t.name for t in settings.auth.tokens] == [
        "profile-service",
        "dashboard",
        "reports",
        "ops",
    ]
