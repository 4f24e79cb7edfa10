"""The files settings point at: TLS certificates and keys, token files.

Read while loading, so that a bad file stops start-up with a message naming
the key, rather than failing at every client's handshake. Messages name the
file, never what it holds.
"""

from __future__ import annotations

import re
import ssl
from pathlib import Path

from cachecoord.config.schema import TlsSettings
from cachecoord.config.values import ConfigError


def check_tls(tls: TlsSettings, source: str) -> None:
    """The certificate, its key and the client CA parse, and the key fits the certificate."""
    if not tls.enabled:
        return
    _certificates(tls.cert_file, f"{source}: tls.cert_file")
    _private_key(tls, source)
    if tls.client_ca_file:
        _certificates(tls.client_ca_file, f"{source}: tls.client_ca_file")


def _certificates(path: str, label: str) -> None:
    """*path* must hold PEM certificates that OpenSSL can parse."""
    text = _pem(path, "CERTIFICATE", label)
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=text)
    except ssl.SSLError as err:
        raise ConfigError(
            f"{label}: {path!r} holds a certificate that cannot be parsed ({err.reason or err})"
        ) from None


def _private_key(tls: TlsSettings, source: str) -> None:
    """The key must be unencrypted (grpc cannot ask for a passphrase) and match the certificate."""
    label = f"{source}: tls.key_file"
    if "ENCRYPTED" in _pem(tls.key_file, "PRIVATE KEY", label):
        raise ConfigError(
            f"{label}: {tls.key_file!r} is encrypted and the server cannot ask for its "
            "passphrase; decrypt it (openssl pkey -in KEY -out KEY.plain)"
        )
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tls.cert_file, tls.key_file)
    except ssl.SSLError as err:
        problem = (
            "is not the private key of the certificate in tls.cert_file"
            if err.reason == "KEY_VALUES_MISMATCH"
            else "cannot be used with the certificate in tls.cert_file"
        )
        raise ConfigError(
            f"{label}: {tls.key_file!r} {problem} {tls.cert_file!r} ({err.reason or err})"
        ) from None


def _pem(path: str, kind: str, label: str) -> str:
    """The text of PEM file *path*, which must hold a ``-----BEGIN ...<kind>-----`` block."""
    text = read_text(path, label)
    if not re.search(rf"-----BEGIN [A-Z ]*{kind}-----", text):
        raise ConfigError(
            f"{label}: {path!r} holds no PEM {kind.lower()} (-----BEGIN ...{kind}-----)"
        )
    return text


def read_text(path: str, label: str) -> str:
    """The file's text; the messages name the file, never what it holds."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{label}: {path!r} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{label}: {path!r} is a directory, not a file") from None
    except OSError as err:
        raise ConfigError(f"{label}: cannot read {path!r}: {err.strerror or err}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{label}: {path!r} is not UTF-8 text") from None
