"""Who may call what: bearer tokens, their scopes, per-token rate limits.

Tokens live in a JSON file next to the config (``server.tokens_file``), written by
``jobserver token create``.  The file holds only SHA-256 hashes of the secrets: a secret is
32 random bytes, so a fast hash is enough (nothing to brute-force), and a stolen file lets
nobody in.  A presented token is hashed and compared against every stored hash with
``hmac.compare_digest`` (constant time, and no early exit on the first match).

``AccessMiddleware`` wraps the ASGI app: it finds the scope a request needs from a rule
table (method + path template, built by the composition root from the OpenAPI table), and
answers 401 (no or bad token), 403 (token lacks the scope) or 429 (rate limit) itself.
The request handlers see only the ``Principal`` it stores in the ASGI scope; they use it
to restrict a client to its own jobs.

Scopes: ``submit``, ``read``, ``cancel``, ``admin``.  ``admin`` implies the others and sees
every client's jobs.  Without any token configured (no tokens file) the server is open
(every request is an anonymous admin), which the server allows only on a loopback address
unless ``allow_anonymous = true``.  Once tokens have been configured (the file exists),
revoking the last one does not reopen it: it refuses every request until a token is
created, unless ``allow_anonymous = true``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import hmac
import ipaddress
import json
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from jobserver.errors import ConfigError, JobServerError

log = logging.getLogger("jobserver.access")

SCOPES = ("submit", "read", "cancel", "admin")
SECRET_PREFIX = "jst_"
PRINCIPAL_KEY = "jobserver.principal"  # where the middleware leaves the caller in the scope
_NAME_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


@dataclass(frozen=True)
class Principal:
    """The caller.  ``name`` is None for the anonymous caller of an open server."""

    name: str | None
    scopes: frozenset[str]

    @property
    def sees_all(self) -> bool:
        return self.name is None or "admin" in self.scopes

    @property
    def owner_filter(self) -> str | None:
        """The owner to restrict job reads and cancels to; None: no restriction."""
        return None if self.sees_all else self.name

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or "admin" in self.scopes


ANONYMOUS = Principal(None, frozenset(SCOPES))
# The caller of an open route (the page) without a valid token, on a server that needs one.
NOBODY = Principal("", frozenset())


def principal_of(scope: Scope) -> Principal:
    """The caller of a request (anonymous admin when no middleware ran: an open server)."""
    found = scope.get(PRINCIPAL_KEY)
    return found if isinstance(found, Principal) else ANONYMOUS


# -- the tokens file ----------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    name: str
    hash: str  # "sha256:<hex>"
    scopes: tuple[str, ...]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "hash": self.hash,
            "scopes": list(self.scopes),
            "created_at": self.created_at,
        }


def hash_secret(secret: str) -> str:
    return "sha256:" + hashlib.sha256(secret.encode()).hexdigest()


def parse_scopes(text: str) -> tuple[str, ...]:
    scopes = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    unknown = [scope for scope in scopes if scope not in SCOPES]
    if not scopes or unknown:
        raise ConfigError(
            f"unknown scope(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(SCOPES)}, comma-separated",
            {"scopes": text},
        )
    return scopes


def read_tokens(path: Path) -> list[Token]:
    """The tokens in ``path``; an absent file means none.  A damaged file is a
    ``ConfigError`` (never silently "no tokens": that would open the server)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigError(f"cannot read tokens file {path}: {exc.strerror}") from None
    try:
        document = json.loads(text)
        tokens = [
            Token(
                name=str(item["name"]),
                hash=str(item["hash"]),
                scopes=tuple(str(scope) for scope in item["scopes"]),
                created_at=str(item.get("created_at", "")),
            )
            for item in document["tokens"]
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(
            f"tokens file {path} is damaged ({type(exc).__name__}: {exc}); "
            "restore it or recreate the tokens with `jobserver token create`",
            {"file": str(path)},
        ) from None
    return tokens


def write_tokens(path: Path, tokens: Sequence[Token]) -> None:
    """Atomically replace the file, readable by its owner only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as file:
        json.dump({"tokens": [token.to_dict() for token in tokens]}, file, indent=2)
        file.write("\n")
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


def create_token(path: Path, name: str, scopes: Sequence[str]) -> str:
    """Add a token and return its secret (shown once; only the hash is stored)."""
    if not _NAME_RE.fullmatch(name):
        raise ConfigError(
            f"token name {name!r}: use 1-64 letters, digits, and _ . @ -", {"name": name}
        )
    tokens = read_tokens(path)
    if any(token.name == name for token in tokens):
        raise ConfigError(
            f"a token named {name!r} already exists in {path}; revoke it first or pick "
            "another name",
            {"name": name},
        )
    secret = SECRET_PREFIX + secrets.token_urlsafe(32)
    created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    write_tokens(path, [*tokens, Token(name, hash_secret(secret), tuple(scopes), created)])
    return secret


def revoke_token(path: Path, name: str) -> None:
    tokens = read_tokens(path)
    kept = [token for token in tokens if token.name != name]
    if len(kept) == len(tokens):
        raise ConfigError(f"no token named {name!r} in {path}", {"name": name})
    write_tokens(path, kept)


class TokenFile:
    """The tokens file as the server sees it: re-read when it changes on disk, so that
    ``jobserver token create`` / ``revoke`` take effect without a restart.  If a changed
    file cannot be read, the previous tokens stay in force (and the problem is logged)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._tokens: list[Token] = []
        self._checked = 0.0
        self.on_change: Callable[[], None] | None = None  # after a reload changed the tokens
        self.reload(strict=True)

    @property
    def configured(self) -> bool:
        """Tokens have been set up here: the file exists, even with every token revoked
        (``revoke_token`` leaves it, with an empty list)."""
        return self._stamp is not None

    def tokens(self) -> list[Token]:
        now = time.monotonic()
        if now - self._checked >= 0.5:  # one stat() per half second at most
            self._checked = now
            self.reload(strict=False)
        return self._tokens

    def reload(self, *, strict: bool) -> None:
        try:
            info = self.path.stat()
            stamp: tuple[int, int, int] | None = (info.st_mtime_ns, info.st_size, info.st_ino)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self._checked:
            return
        try:
            tokens = read_tokens(self.path)
        except ConfigError:
            if strict:
                raise
            log.exception("keeping the previous tokens")
            return
        changed = (stamp is None, tokens) != (self._stamp is None, self._tokens)
        self._tokens, self._stamp = tokens, stamp
        if changed and self.on_change is not None:
            self.on_change()

    def authenticate(self, secret: str) -> Token | None:
        presented = hash_secret(secret).encode()
        found = None
        for token in self.tokens():  # no early exit: the time does not depend on the match
            if hmac.compare_digest(presented, token.hash.encode()):
                found = token
        return found


# -- rate limiting ------------------------------------------------------------------------


@dataclass
class _Bucket:
    tokens: float
    updated: float


@dataclass
class RateLimiter:
    """A token bucket per caller: ``rate`` requests per second, bursts up to ``burst``."""

    rate: float
    burst: int
    clock: Any = time.monotonic
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    def acquire(self, key: str) -> float:
        """0 if the request may go ahead, else the seconds to wait before retrying."""
        now = self.clock()
        if len(self._buckets) > 10_000:  # forget callers whose bucket has refilled
            full = [k for k, b in self._buckets.items() if now - b.updated > self.burst / self.rate]
            for stale in full:
                del self._buckets[stale]
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return 0.0
        return (1 - bucket.tokens) / self.rate


# -- the middleware -----------------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """Requests with ``method`` on a path matching ``template`` ("/api/v1/jobs/{job_id}")
    need ``scope``; ``scope = None`` means open to anyone (no token needed)."""

    method: str
    template: str
    scope: str | None

    def matches(self, method: str, path: str) -> bool:
        return method == self.method and _compile(self.template).fullmatch(path) is not None


@functools.cache  # a small fixed set of templates, matched on every request
def _compile(template: str) -> re.Pattern[str]:
    parts = re.split(r"(\{[^}]+\})", template)
    return re.compile("".join("[^/]+" if p.startswith("{") else re.escape(p) for p in parts))


@dataclass(frozen=True)
class Policy:
    tokens: TokenFile
    rules: tuple[Rule, ...]
    # No tokens file (never configured): everyone is an anonymous admin (loopback only,
    # unless allow_anonymous).
    open_without_tokens: bool
    limiter: RateLimiter | None = None
    # server.allow_anonymous: open without tokens even once tokens were configured.
    allow_anonymous: bool = False

    def __post_init__(self) -> None:
        self.tokens.on_change = self.log_state
        self.log_state()

    def anonymous(self, tokens: Sequence[Token]) -> bool:
        """Whether a request without a token gets in (as the anonymous admin)."""
        if tokens:
            return False
        return self.allow_anonymous or (self.open_without_tokens and not self.tokens.configured)

    def log_state(self) -> None:
        """One line on who gets in, at start and whenever the tokens file changes it."""
        tokens, path = self.tokens.tokens(), self.tokens.path
        if tokens:
            log.info("access: %d token(s) in %s; every request needs one", len(tokens), path)
        elif self.anonymous(tokens):
            log.warning(
                "access: no tokens in %s: open to anyone who can connect (%s)",
                path,
                "server.allow_anonymous = true" if self.allow_anonymous else "loopback only",
            )
        else:
            log.warning(
                "access: %s has no tokens left (all revoked): every request without a "
                "valid token is refused (401); create one with `jobserver token create`, "
                "or set server.allow_anonymous = true (or remove the file, on loopback) "
                "to serve without tokens",
                path,
            )

    def required_scope(self, method: str, path: str) -> tuple[bool, str | None]:
        """(a rule matched, its scope).  HEAD is checked as GET.  A path without
        parameters is one dictionary look-up; the rules with parameters are tried in order
        (each a regex match, on every request)."""
        method = "GET" if method == "HEAD" else method
        exact = self._exact_rules
        if (method, path) in exact:
            return True, exact[method, path]
        for rule in self._templated_rules:
            if rule.matches(method, path):
                return True, rule.scope
        return False, None

    @functools.cached_property
    def _exact_rules(self) -> dict[tuple[str, str], str | None]:
        return {(r.method, r.template): r.scope for r in self.rules if "{" not in r.template}

    @functools.cached_property
    def _templated_rules(self) -> tuple[Rule, ...]:
        return tuple(r for r in self.rules if "{" in r.template)


class AccessMiddleware:
    """Pure ASGI: authenticate, authorise, rate-limit; then the app sees ``Principal``.

    A request that matches no rule (an unknown path or method) still needs a valid token,
    so an unauthenticated caller cannot even map the routes.
    """

    def __init__(self, app: ASGIApp, policy: Policy) -> None:
        self.app = app
        self.policy = policy

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        policy = self.policy
        matched, needed = policy.required_scope(scope["method"], scope["path"])
        if matched and needed is None:
            # Open to anyone, but the endpoint learns who calls: the page carries data
            # only for a caller who may read it.
            scope[PRINCIPAL_KEY] = self._caller(scope)
            await self.app(scope, receive, send)
            return
        tokens = policy.tokens.tokens()
        if policy.anonymous(tokens):
            principal = ANONYMOUS
        else:
            secret = _bearer(scope)
            token = policy.tokens.authenticate(secret) if secret else None
            if token is None:
                message = (
                    "send a valid token: 'Authorization: Bearer <token>' "
                    "(create one with `jobserver token create NAME --scopes ...`)"
                )
                if not tokens:
                    message = (
                        "this server has no tokens (never created, or all revoked) and is "
                        "not open to anonymous requests; create one with "
                        "`jobserver token create NAME --scopes ...`"
                    )
                await _deny(
                    scope,
                    receive,
                    send,
                    401,
                    JobServerError(
                        message if secret is None or not tokens else "invalid token",
                        None if secret is None else {"hint": message},
                        code="unauthorized",
                    ),
                    {"WWW-Authenticate": 'Bearer realm="jobserver"'},
                )
                return
            principal = Principal(token.name, frozenset(token.scopes))
            if needed is not None and not principal.allows(needed):
                await _deny(
                    scope,
                    receive,
                    send,
                    403,
                    JobServerError(
                        f"token {token.name!r} lacks the {needed!r} scope this request needs",
                        {"required_scope": needed, "token_scopes": sorted(token.scopes)},
                        code="forbidden",
                    ),
                )
                return
        if policy.limiter is not None:
            key = principal.name or _client_host(scope)
            wait = policy.limiter.acquire(key)
            if wait > 0:
                retry_after = max(1, math.ceil(wait))
                await _deny(
                    scope,
                    receive,
                    send,
                    429,
                    JobServerError(
                        f"rate limit exceeded ({policy.limiter.rate:g} requests per second, "
                        f"bursts of {policy.limiter.burst}); retry in {retry_after} s",
                        {
                            "limit": "rate_limit",
                            "rate": policy.limiter.rate,
                            "burst": policy.limiter.burst,
                        },
                        code="rate_limited",
                    ),
                    {"Retry-After": str(retry_after)},
                )
                return
        scope[PRINCIPAL_KEY] = principal
        await self.app(scope, receive, send)

    def _caller(self, scope: Scope) -> Principal:
        """Who calls an open route: the anonymous admin of an open server, a token's
        principal, or ``NOBODY``."""
        if self.policy.anonymous(self.policy.tokens.tokens()):
            return ANONYMOUS
        secret = _bearer(scope)
        token = self.policy.tokens.authenticate(secret) if secret else None
        return NOBODY if token is None else Principal(token.name, frozenset(token.scopes))


def _bearer(scope: Scope) -> str | None:
    headers: list[tuple[bytes, bytes]] = scope.get("headers", [])
    for key, value in headers:
        if key == b"authorization":
            kind, _, secret = value.decode("latin-1").partition(" ")
            if kind.lower() == "bearer" and secret.strip():
                return secret.strip()
            return ""  # present but not a bearer token: a bad token, not a missing one
    return None


def _client_host(scope: Scope) -> str:
    client = scope.get("client")
    return str(client[0]) if client else "anonymous"


async def _deny(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    error: JobServerError,
    headers: dict[str, str] | None = None,
) -> None:
    # Drain nothing: the body is never read, and the server closes the exchange.
    response = JSONResponse({"error": error.to_dict()}, status_code=status, headers=headers)
    await response(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host in ("localhost", "localhost.localdomain"):
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    return False


def rules_for(operations: Iterable[tuple[str, str, str | None]]) -> tuple[Rule, ...]:
    return tuple(Rule(method, template, scope) for method, template, scope in operations)
