"""Plain HTTP on the websocket port: health checks, Prometheus metrics and the status page.

websockets hands every request's headers to ``process_request`` before its opening handshake;
:meth:`StatusEndpoints.process_request` lets websocket upgrades through and answers the rest:

=================  =========================================================  ==============
path               answer                                                      access
=================  =========================================================  ==============
``/healthz``       200 ``ok`` while the process serves (liveness)              anyone
``/readyz``        200 once the model is loaded, the state resumed and the     admin
                   socket listening; 503 before
``/metrics``       Prometheus text format (:mod:`.telemetry`)                  admin
``/api/status``    the JSON status (:meth:`.fleet.Fleet.snapshot`)             admin
``/``              the status page (``status_page.html``; polls /api/status)   admin
=================  =========================================================  ==============

"admin" means: with ``--admin-token-file``, a request must carry the token as
``Authorization: Bearer TOKEN`` (Prometheus' ``authorization``/``bearer_token_file``) or as the
password of HTTP Basic auth (what a browser prompts for; the page's own requests then carry it),
compared in constant time; anything else gets 401 and a one-line body, nothing more. Without a
token file these paths answer loopback peers only (403 for others). Nothing served contains a
client token: the status is built from metrics events, which never hold one.

Each answer closes its connection (websockets speaks HTTP/1.1 only for the handshake). The
bodies of ``/metrics`` and ``/api/status`` are built at most once per :data:`CACHE_SECONDS` and
shared by every request in between, so a flood of them (many open pages, an eager scraper) costs
the event loop that moves the clients' tensors little more than the HTTP exchange itself.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import http
import importlib.resources
import ipaddress
import json
import logging
import math
import time
from typing import TYPE_CHECKING, Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from flexsfl import __version__
from flexsfl.server_backend.fleet import Fleet
from flexsfl.server_backend.telemetry import CONTENT_TYPE, Telemetry

if TYPE_CHECKING:
    from websockets.asyncio.server import ServerConnection

    from flexsfl.server_backend.server import FlexServer, Session

__all__ = ["StatusEndpoints", "PAGE", "CACHE_SECONDS"]

log = logging.getLogger("flexsfl.server.http")

PAGE = "status_page.html"  # package data beside this module
CACHE_SECONDS = 1.0  # the page polls every 2 s; Prometheus scrapes every 15 s or so
_PAGE_CSP = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
             "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


class _QuietHTTP(logging.Filter):
    """websockets logs every plain HTTP answer at INFO; a page polling every 2 s would drown the log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("HTTP response sent")


_ws_log = logging.getLogger("websockets.server")
if not any(isinstance(f, _QuietHTTP) for f in _ws_log.filters):
    _ws_log.addFilter(_QuietHTTP())


class StatusEndpoints:
    """The observability side of one :class:`~.server.FlexServer`.

    Create it once the server has its worker, registry and state; it subscribes to the state's
    metrics events. The server must call :meth:`opened` when a session starts and :meth:`closed`
    when it ends (so byte counts survive reconnects), and pass :meth:`process_request` to
    ``serve()``.
    """

    def __init__(self, server: "FlexServer", *, admin_token: str | None = None) -> None:
        self.server = server
        cfg = server.strategy.cfg
        registered = server.registry.clients if server.registry is not None else ()
        self.fleet = Fleet(rounds_total=cfg.rounds, local_steps=cfg.local_steps, registered=registered)
        self._sessions: dict[int, "Session"] = {}
        self.telemetry = Telemetry(self.fleet, live=self._live, queue_depth=server.worker.queue_depth)
        self._admin = admin_token.encode() if admin_token else None
        self._page = importlib.resources.files("flexsfl.server_backend").joinpath(PAGE).read_bytes()
        self._cache: dict[str, tuple[float, bytes]] = {}  # path -> (monotonic time built, body)
        server.state.listeners.append(self._observe)

    # -- hooks the server calls -----------------------------------------------------------------
    def opened(self, session: "Session") -> None:
        self._sessions[id(session)] = session

    def closed(self, session: "Session") -> None:
        if self._sessions.pop(id(session), None) is not None:
            self.fleet.retire(session.client_id, session.bytes_in, session.bytes_out)

    def _observe(self, event: str, row: dict[str, Any]) -> None:
        try:
            self.telemetry.observe(event, row)
        except Exception:  # noqa: BLE001 - a telemetry bug must never fail a training step
            log.exception("telemetry could not take a %r event", event)

    def _live(self) -> dict[str, tuple[int, int]]:
        live: dict[str, tuple[int, int]] = {}
        for s in list(self._sessions.values()):
            bi, bo = live.get(s.client_id, (0, 0))  # a replaced connection still closing adds to its client
            live[s.client_id] = (bi + s.bytes_in, bo + s.bytes_out)
        return live

    def status(self) -> dict[str, Any]:
        """The JSON document of ``/api/status``."""
        s = self.server
        info = s.host.info
        extra = {"version": __version__, "model": info.id, "task": info.task, "strategy": s.strategy.name,
                 "ready": s.ready.is_set(), "auth": "token" if self._admin else "loopback"}
        return self.fleet.snapshot(self._live(), extra=extra)

    # -- HTTP -----------------------------------------------------------------------------------
    def process_request(self, connection: "ServerConnection", request: Request) -> Response | None:
        """websockets' hook: None lets a websocket handshake go on; otherwise the HTTP answer."""
        if "websocket" in request.headers.get("Upgrade", "").lower():
            return None
        path = request.path.split("?", 1)[0]
        if path == "/healthz":
            return _response(200, b"ok\n")
        denied = self._deny(connection, request)
        if denied is not None:
            return denied
        if path == "/readyz":
            return _response(200, b"ready\n") if self.server.ready.is_set() else _response(503, b"starting\n")
        if path == "/metrics":
            return _response(200, self._cached(path, self.telemetry.exposition), CONTENT_TYPE)
        if path == "/api/status":
            body = self._cached(path, lambda: json.dumps(_finite(self.status()), separators=(",", ":"),
                                                         allow_nan=False).encode())
            return _response(200, body, "application/json")
        if path in ("/", "/index.html"):
            return _response(200, self._page, "text/html; charset=utf-8", {"Content-Security-Policy": _PAGE_CSP})
        return _response(404, b"not found: try /, /api/status, /metrics, /healthz or /readyz\n")

    def _cached(self, path: str, build) -> bytes:
        now = time.monotonic()
        hit = self._cache.get(path)
        if hit is None or now - hit[0] >= CACHE_SECONDS:
            hit = self._cache[path] = (now, build())
        return hit[1]

    def _deny(self, connection: "ServerConnection", request: Request) -> Response | None:
        if self._admin is None:
            peer = connection.remote_address[0] if connection.remote_address else ""
            if _loopback(peer):
                return None
            return _response(403, b"forbidden: this server shows its status to loopback only; "
                                  b"start it with --admin-token-file to allow remote access\n")
        if hmac.compare_digest(_presented(request.headers.get("Authorization", "")), self._admin):
            return None
        return _response(401, b"unauthorized\n", extra={"WWW-Authenticate": 'Basic realm="flexsfl", charset="UTF-8"'})


def _presented(header: str) -> bytes:
    """The token an Authorization header carries: Bearer TOKEN, or Basic with TOKEN as password."""
    scheme, _, value = header.strip().partition(" ")
    value = value.strip()
    if scheme.lower() == "bearer":
        return value.encode()
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value, validate=True).partition(b":")[2]
        except (binascii.Error, ValueError):
            return b""
    return b""


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def _finite(v: Any) -> Any:
    """NaN and infinities become null: browsers' JSON.parse refuses them."""
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _response(status: int, body: bytes, content_type: str = "text/plain; charset=utf-8",
              extra: dict[str, str] | None = None) -> Response:
    headers = Headers({"Content-Type": content_type, "Content-Length": str(len(body)), "Connection": "close",
                       "Cache-Control": "no-store", "X-Content-Type-Options": "nosniff", **(extra or {})})
    return Response(status, http.HTTPStatus(status).phrase, headers, body)
