"""What keeps a web page in the user's browser from driving the router (as Ollama after CVE-2024-28224).

On the default settings (loopback, no key) any page the user opens can send requests to
127.0.0.1. Three holes, three checks, all before authentication:

- **DNS rebinding**: a page on `attacker.example` re-points its name to 127.0.0.1 and reads the
  answers as same-origin. Its requests carry `Host: attacker.example`, so the Host header must
  be a name the router is reached by (`HostNames`; `--allowed-hosts` adds more).
- **Cross-site writes**: a "simple" request (a form, or `fetch` with `text/plain`) is sent
  without a CORS preflight. So a state-changing request that carries an `Origin` (browsers
  always send one on POST) must come from an allowed origin, and POST bodies must say
  `application/json`, which a page on another origin cannot send without a preflight that this
  server never grants.
- **Framing**: the status page is sent with a Content-Security-Policy that allows only its own
  inline script and styles and same-origin fetches, and refuses to be framed (clickjacking).

Clients that are not browsers (OpenAI SDKs, curl, clearml-serving's forwarder, the ops CLI) send
a Host naming the address they were given and no Origin, so they pass unchanged.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from clearml_umem.router.errors import APIError

LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1", "localhost.localdomain", "ip6-localhost"})

STATUS_PAGE_HEADERS = {
    "content-security-policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
"""The status page is one HTML file with inline script and styles that fetches `/admin/status`."""

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


@dataclass(frozen=True)
class HostNames:
    """The names (and addresses) a Host or Origin header may carry; `any_host` turns the check off."""

    names: frozenset[str]
    any_host: bool = False

    def allows(self, host: str) -> bool:
        return self.any_host or _strip_port(host) in self.names

    @classmethod
    def for_listen_address(cls, listen_host: str, extra: Iterable[str] = ()) -> HostNames:
        """Localhost names and the listen address; the machine's names and addresses too when it
        listens on every interface (`0.0.0.0`, `::`) or on one of them."""
        extra = [e.strip().lower() for e in extra if e.strip()]
        if "*" in extra:
            return cls(frozenset(), any_host=True)
        names = set(LOOPBACK_NAMES) | {listen_host.strip("[]").lower()} | {_strip_port(e) for e in extra}
        if not _is_loopback(listen_host):
            names |= _machine_names()
        return cls(frozenset(names))



def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOOPBACK_NAMES


def _machine_names() -> set[str]:
    """This machine's host names and the addresses of its interfaces."""
    names = {socket.gethostname().lower(), socket.getfqdn().lower()}
    try:
        import psutil

        for addresses in psutil.net_if_addrs().values():
            for address in addresses:
                if address.family in (socket.AF_INET, socket.AF_INET6):
                    names.add(address.address.split("%")[0].lower())
    except (ImportError, OSError):
        pass
    return {n for n in names if n}


def _strip_port(host: str) -> str:
    """`name:port`, `[v6]:port`, `[v6]` or a bare name, lowercased and without the port."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    if host.count(":") == 1:
        return host.split(":", 1)[0]
    return host.rstrip(".") if host.count(":") == 0 else host


DEFAULT_HOSTS = HostNames.for_listen_address("127.0.0.1")


BINARY_BODY_PREFIXES = ("/v2/",)
"""Triton's routes take bodies that are not JSON (the binary tensor extension) and tritonclient.http
sends no Content-Type: exempt from the JSON rule; the Host and Origin checks still apply to them
(a browser always sends an Origin on a cross-site POST)."""


class BrowserGuard:
    """Pure ASGI (streams pass through untouched): Host, Origin and content type checked, and the
    status page's protective headers added."""

    def __init__(self, app: ASGIApp, hosts: HostNames = DEFAULT_HOSTS,
                 page_paths: frozenset[str] = frozenset({"/", "/ui"})) -> None:
        self.app = app
        self.hosts = hosts
        self.page_paths = page_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            await refusal.response()(scope, receive, send)
            return
        if scope.get("path") not in self.page_paths:
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in STATUS_PAGE_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = Headers(scope=scope)
        host = headers.get("host")
        if host is not None and not self.hosts.allows(host):
            return APIError(403, f"Host {host!r} is not a name this server is reached by; add it "
                            "with --allowed-hosts (UMEM_ALLOWED_HOSTS) if it is", code="host_not_allowed")
        method = scope.get("method", "GET")
        if method in SAFE_METHODS:
            return None
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin):
            return APIError(403, f"Requests from the web page at {origin!r} are not accepted (cross-origin); "
                            "add its host with --allowed-hosts (UMEM_ALLOWED_HOSTS) if it should be",
                            code="origin_not_allowed")
        if method == "POST" and not scope.get("path", "").startswith(BINARY_BODY_PREFIXES):
            media = headers.get("content-type", "").split(";", 1)[0].strip().lower()
            if media != "application/json" and not media.endswith("+json"):
                return APIError(415, f"The request body must be JSON sent with 'Content-Type: application/json', "
                                f"got {media or 'no content type'!r}", code="unsupported_media_type")
        return None

    def _origin_allowed(self, origin: str) -> bool:
        if self.hosts.any_host:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.hostname is not None and self.hosts.allows(
            parts.hostname if ":" not in parts.hostname else f"[{parts.hostname}]")
