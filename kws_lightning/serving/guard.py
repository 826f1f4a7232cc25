"""Which web pages may drive the service: every request's `Host` and `Origin` are checked before the app.

A browser lets any page it shows POST to (or open a WebSocket on) 127.0.0.1; it always says which page
asked, in `Origin`, and which name it resolved, in `Host`. So:

- `Host` must be a name this service answers to: an IP address (a page at an address is only ever the
  server itself), ``localhost``, the bind address, or the host of an `allowed_origins` entry. Any other
  name is a page that resolved its own domain to this machine (DNS rebinding): 400.
- `Origin`, when sent, must be the server's own page (its host:port is the `Host` asked for) or listed in
  `allowed_origins`: else 403, for HTTP and WebSocket alike. Requests without one (curl, scripts) pass.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable, Sequence
from urllib.parse import urlsplit

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

log = logging.getLogger(__name__)
LOCAL_NAMES = ("localhost",)
_MAX_LOGGED = 1000  # refused values logged once each, up to this many (a flood must not fill the log)


def normalise_origin(value: str) -> str:
    """``scheme://host[:port]`` of an `allowed_origins` entry, lower-cased; ValueError naming the fix."""
    text = str(value).strip().rstrip("/").lower()
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path or parts.query:
        raise ValueError(
            f"allowed_origins entry {value!r} is not an origin: write scheme://host[:port] as a browser "
            "sends it, e.g. allowed_origins='[http://localhost:3000]'"
        )
    return text


def host_name(netloc: str) -> str:
    """The host of ``host[:port]`` (brackets of an IPv6 address removed), lower-cased."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc[1 : netloc.find("]")] if "]" in netloc else netloc
    return netloc.rpartition(":")[0] if netloc.count(":") == 1 else netloc


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


class RequestGuard:
    """ASGI middleware refusing requests whose `Host` or `Origin` is not this service's (see the module)."""

    def __init__(self, app: ASGIApp, bind_host: str, allowed_origins: Iterable[str] = ()) -> None:
        self.app = app
        self.allowed_origins = frozenset(normalise_origin(o) for o in allowed_origins)
        self.hosts = frozenset(
            {
                *LOCAL_NAMES,
                host_name(bind_host),
                *(host_name(urlsplit(o).netloc) for o in self.allowed_origins),
            }
        )
        self.logged: set[tuple[str, str]] = set()

    def host_allowed(self, host: str) -> bool:
        name = host_name(host)
        return name in self.hosts or is_ip_address(name)

    def origin_allowed(self, origin: str, host: str) -> bool:
        origin = origin.strip().rstrip("/").lower()
        return urlsplit(origin).netloc == host.strip().lower() or origin in self.allowed_origins

    def refusal(self, headers: Sequence[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
        """(status, code, detail) when the request must be refused, else None."""
        values = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in headers}
        host, origin = values.get("host"), values.get("origin")
        if host is not None and not self.host_allowed(host):
            self.log_once("Host", host)
            return (
                400,
                "bad_host",
                f"Host {host!r} is not a name this service answers to (an IP address, localhost, or the "
                "host of an allowed_origins entry): open it by address, or add the page's origin to "
                "allowed_origins",
            )
        if origin is not None and not self.origin_allowed(origin, host or ""):
            self.log_once("Origin", origin)
            return (
                403,
                "bad_origin",
                f"requests from the page {origin!r} are refused: only this service's own page may use it; "
                f"start the service with allowed_origins='[{origin}]' to let that page in",
            )
        return None

    def log_once(self, header: str, value: str) -> None:
        if (header, value) not in self.logged and len(self.logged) < _MAX_LOGGED:
            self.logged.add((header, value))
            log.warning("refused a request with %s: %r (see allowed_origins)", header, value)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = self.refusal(scope["headers"]) if scope["type"] in ("http", "websocket") else None
        if refused is None:
            await self.app(scope, receive, send)
            return
        status, code, detail = refused
        if scope["type"] == "websocket" and "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})  # the server answers the handshake 403
            return
        await JSONResponse({"error": code, "detail": detail}, status_code=status)(scope, receive, send)
