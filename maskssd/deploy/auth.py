"""Who may use ``maskssd serve``: bearer tokens, one per client (a camera, a dashboard), and a request rate per
client.

* Tokens come from a file (``--token-file``: one per line, ``#`` comments) or the environment
  (``MASKSSD_SERVE_TOKENS``: separated by commas or whitespace), never from a command-line argument (other users
  of the machine can read those) and never into a log. Each is compared in constant time (``hmac``). Removing a
  line revokes that client.
* Every route but ``GET /livez`` (a bare liveness probe for load balancers and orchestrators) needs
  ``Authorization: Bearer <token>``; a request without it, or with a wrong one, gets 401 with
  ``WWW-Authenticate: Bearer``.
* Each client (each token) may make ``rate`` requests per second on average, ``burst`` at once (a token bucket);
  beyond that it gets 429 with ``Retry-After``, and the other clients are not slowed.
"""

from __future__ import annotations

import hmac
import math
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from maskssd.errors import MaskSSDError

__all__ = [
    "LIVENESS_PATH",
    "TOKEN_ENV",
    "AuthMiddleware",
    "RateLimiter",
    "TokenSet",
    "is_loopback",
    "load_tokens",
]

#: The one route that needs no token: liveness only, no information about the model.
LIVENESS_PATH = "/livez"
#: Where tokens may come from instead of a file.
TOKEN_ENV = "MASKSSD_SERVE_TOKENS"
MIN_TOKEN_LENGTH = 16


def load_tokens(token_file: str | Path | None = None, env: str = TOKEN_ENV) -> list[str]:
    """The tokens of ``token_file`` (one per line, blank lines and ``#`` comments ignored), else of the
    environment variable ``env``; refuses a token shorter than 16 characters (guessable) with its line."""
    if token_file is not None:
        path = Path(token_file)
        try:
            text = path.read_text()
        except OSError as e:
            raise MaskSSDError(f"--token-file {path}: {e.strerror or e}") from None
        where = [f"{path}:{i}" for i in range(1, text.count("\n") + 2)]
        lines = [
            (w, line.split("#", 1)[0].strip()) for w, line in zip(where, text.splitlines(), strict=False)
        ]
    else:
        raw = os.environ.get(env, "")
        lines = [(f"${env}", t) for t in re.split(r"[\s,]+", raw)]
    tokens = []
    for where_, token in lines:
        if not token:
            continue
        if len(token) < MIN_TOKEN_LENGTH:
            raise MaskSSDError(
                f"{where_}: a token of {len(token)} characters is too short to be secret (at least "
                f"{MIN_TOKEN_LENGTH}; e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        tokens.append(token)
    if token_file is not None and not tokens:
        raise MaskSSDError(f"--token-file {token_file} holds no token")
    return tokens


@dataclass
class TokenSet:
    """The accepted tokens; :meth:`client` names the client a header belongs to (``client-1`` ...), or None."""

    tokens: list[str]

    def client(self, authorization: str | None) -> str | None:
        """The client of an ``Authorization: Bearer <token>`` header, compared in constant time against every
        token (no early exit that would tell how many tokens or which prefix matched)."""
        if not authorization:
            return None
        scheme, _, given = authorization.partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            return None
        given_b = given.strip().encode()
        found = None
        for i, token in enumerate(self.tokens, start=1):
            if hmac.compare_digest(given_b, token.encode()) and found is None:
                found = f"client-{i}"
        return found


@dataclass
class _Bucket:
    level: float
    at: float


@dataclass
class RateLimiter:
    """A token bucket per client: ``rate`` requests per second, ``burst`` at once. :meth:`admit` returns 0 when
    a request may go, else the seconds to wait (the ``Retry-After``)."""

    rate: float
    burst: int
    clock: object = time.monotonic
    buckets: dict[str, _Bucket] = field(default_factory=dict)

    def admit(self, client: str) -> float:
        if self.rate <= 0:
            return 0.0
        now = self.clock()  # type: ignore[operator]
        b = self.buckets.get(client)
        if b is None:
            b = self.buckets[client] = _Bucket(float(self.burst), now)
        b.level = min(float(self.burst), b.level + (now - b.at) * self.rate)
        b.at = now
        if b.level >= 1.0:
            b.level -= 1.0
            return 0.0
        return (1.0 - b.level) / self.rate


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` value: whole seconds, at least 1."""
    return str(max(1, math.ceil(seconds)))


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine (127.0.0.0/8, ::1, localhost)."""
    import ipaddress

    if host in ("localhost", "ip6-localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class AuthMiddleware:
    """Bearer tokens on every route but the liveness probe, then each client's request rate (pure ASGI, before
    any body is read). ``tokens`` None: no authentication (``--insecure-no-auth``), clients told apart by
    address for the rate limit."""

    def __init__(self, app: Any, tokens: TokenSet | None, limiter: RateLimiter | None):
        self.app, self.tokens, self.limiter = app, tokens, limiter

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope.get("path") == LIVENESS_PATH:
            await self.app(scope, receive, send)
            return
        if self.tokens is not None:
            headers = dict(scope.get("headers") or [])
            auth = headers.get(b"authorization", b"").decode("latin-1") or None
            client = self.tokens.client(auth)
            if client is None:
                reason = "a bearer token is required" if auth is None else "the bearer token is not accepted"
                await _reply(send, 401, reason, {"www-authenticate": 'Bearer realm="maskssd"'})
                return
        else:
            client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.limiter.admit(client) if self.limiter is not None else 0.0
        if wait > 0:
            limit = f"{self.limiter.rate:g} requests/s, bursts of {self.limiter.burst}"  # type: ignore[union-attr]
            await _reply(send, 429, f"rate limit of {limit} exceeded", {"retry-after": retry_after(wait)})
            return
        scope.setdefault("state", {})["client"] = client
        await self.app(scope, receive, send)


async def _reply(send: Any, status: int, reason: str, headers: dict[str, str]) -> None:
    import json

    body = json.dumps({"detail": reason}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.encode(), v.encode()) for k, v in headers.items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
