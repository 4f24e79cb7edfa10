"""Bearer tokens and per-namespace permissions, checked before a handler runs.

The handler decorators of rpc/status.py call :meth:`Authorizer.admit`, so the
servicer stays a translator and no RPC can skip the check: every method of
CacheCoordService needs a rule in :data:`RULES`, or decorating it fails at
import (fail closed, not open).

A presented token is hashed (SHA-256) and compared with the hash of every
configured token by ``hmac.compare_digest``, without stopping at a match: the
time a call takes tells neither how much of a guess was right nor which
token matched, and equal-length digests hide the tokens' lengths too. Only
hashes are kept. Messages and logs name a token by its configured ``name``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import grpc

from cachecoord.config import ANY, Action, TokenSettings
from cachecoord.errors import PermissionDenied, Unauthenticated
from cachecoord.rpc.registration import Undecodable

log = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

_NOTHING: frozenset[Action] = frozenset()
_SHOWN = 200  # characters of a client-chosen name shown in a message or log line


@dataclass(frozen=True, slots=True)
class Principal:
    """The holder of one configured token, and what it may do."""

    name: str
    namespaces: Mapping[str, frozenset[Action]]
    lock_prefixes: tuple[str, ...]

    @classmethod
    def of(cls, token: TokenSettings) -> Principal:
        return cls(token.name, dict(token.permissions), token.lock_prefixes)

    def require(self, action: Action, namespace: str) -> None:
        """Raise PermissionDenied unless *action* is granted on *namespace*."""
        if action in self.namespaces.get(ANY, _NOTHING):
            return
        if action in self.namespaces.get(namespace, _NOTHING):
            return
        self._deny(action, f"namespace {namespace[:_SHOWN]!r}")

    def require_lock(self, name: str) -> None:
        """Raise PermissionDenied unless a lock prefix of this token covers *name*."""
        for prefix in self.lock_prefixes:
            if prefix == ANY or name.startswith(prefix):
                return
        self._deny(Action.LOCK, f"lock {name[:_SHOWN]!r}")

    def _deny(self, action: Action, target: str) -> NoReturn:
        log.info("denied: token %r lacks the %r permission on %s", self.name, action.value, target)
        raise PermissionDenied(
            f"the token named {self.name!r} lacks the {action.value!r} permission on {target}"
        )


Rule = Callable[[Principal, Any], None]
"""What one request of an RPC needs: raises PermissionDenied if not granted."""


def _on_namespace(action: Action) -> Rule:
    def rule(principal: Principal, request: Any) -> None:
        principal.require(action, request.namespace)

    return rule


def _watch(principal: Principal, request: Any) -> None:
    for namespace in request.namespaces:
        principal.require(Action.WATCH, namespace)


def _lock(principal: Principal, request: Any) -> None:
    principal.require_lock(request.name)


def _hold_lock(principal: Principal, request: Any) -> None:
    # Checked on every message of the stream; only `acquire` and `resume` name
    # a lock (release and keep_alive act on the lock the stream already holds).
    kind = request.WhichOneof("kind")
    if kind in ("acquire", "resume"):
        principal.require_lock(getattr(request, kind).name)


RULES: Mapping[str, Rule] = {
    "Get": _on_namespace(Action.READ),
    "BatchGet": _on_namespace(Action.READ),
    "Put": _on_namespace(Action.WRITE),
    "Delete": _on_namespace(Action.WRITE),
    "Invalidate": _on_namespace(Action.INVALIDATE),
    "InvalidateTags": _on_namespace(Action.INVALIDATE),
    "Watch": _watch,
    "AcquireLock": _lock,
    "ReleaseLock": _lock,
    "ExtendLock": _lock,
    "HoldLock": _hold_lock,
}


def rule_of(method: str) -> Rule:
    """The rule of RPC *method*; a method without one is a programming error."""
    try:
        return RULES[method]
    except KeyError:
        raise LookupError(
            f"RPC {method} has no permission rule: add one to RULES in cachecoord/rpc/auth.py"
        ) from None


class Authorizer:
    """Authenticates calls by bearer token and checks their permissions."""

    def __init__(self, tokens: Sequence[TokenSettings]) -> None:
        if not tokens or not all(token.digest for token in tokens):
            raise ValueError("Authorizer needs tokens loaded with auth enabled (with digests)")
        self._tokens = tuple((token.digest, Principal.of(token)) for token in tokens)

    def admit(self, context: Context, rule: Rule, request: Any) -> Principal:
        """Authenticate the call, then check *rule* on *request*. An unparsable
        request is only authenticated: the caller answers it INVALID_ARGUMENT."""
        principal = self.authenticate(context)
        if not isinstance(request, Undecodable):
            rule(principal, request)
        return principal

    def authenticate(self, context: Context) -> Principal:
        """The principal of the call's bearer token; Unauthenticated if none matches."""
        digest = hashlib.sha256(_bearer(context).encode("utf-8", "surrogatepass")).digest()
        found: Principal | None = None
        for candidate, principal in self._tokens:
            if hmac.compare_digest(candidate, digest):
                found = principal
        if found is None:
            log.info("rejected a call with an unknown bearer token from %s", context.peer())
            raise Unauthenticated("the bearer token is not valid for this server")
        return found


def _bearer(context: Context) -> str:
    """The token of the call's ``authorization: Bearer <token>`` metadata."""
    values = [value for key, value in context.invocation_metadata() or () if key == "authorization"]
    if not values:
        raise Unauthenticated(
            "this server requires a bearer token: send the metadata `authorization: Bearer <token>`"
        )
    scheme, _, token = str(values[0]).partition(" ")
    if len(values) > 1 or scheme.lower() != "bearer" or not token.strip():
        raise Unauthenticated("send one `authorization: Bearer <token>` metadata entry")
    return token.strip()
