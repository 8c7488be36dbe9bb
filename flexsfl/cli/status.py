"""``flexsfl status URL``: a running server's status as tables in a terminal (for ssh sessions).

It reads the server's ``/api/status`` (the document behind its status page) and prints the round,
a table of clients and the last rounds. ``URL`` is the server's address in any of the forms an
operator has at hand — ``ws://host:8765``, ``https://host:8765/``, ``host:8765`` — since the
status is served on the websocket port. Torch-free: it needs only the standard library and rich.
"""

from __future__ import annotations

import argparse
import json
import ssl
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from flexsfl.core.errors import ConfigError, FlexSFLError
from flexsfl.core.tokens import read_admin_token

__all__ = ["add_parser", "status_url", "fetch_status", "render"]

_HISTORY_ROWS = 5  # past rounds shown under the clients table


def status_url(url: str) -> str:
    """The ``/api/status`` URL of the server at ``url`` (ws/wss become http/https)."""
    if "://" not in url:
        url = "http://" + url
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{url!r} is not a server address; give host:port, ws://host:port or https://host:port")
    return urllib.parse.urlunsplit((scheme, parts.netloc, "/api/status", "", ""))


def fetch_status(url: str, *, token: str | None = None, ca_file: str | None = None, timeout: float = 10.0) -> dict[str, Any]:
    """GET the status document; one-line FlexSFLError for every way that can fail."""
    api = status_url(url)
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ctx = ssl.create_default_context(cafile=ca_file) if api.startswith("https:") else None
    try:
        with urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=timeout, context=ctx) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        if e.code == 401:
            raise FlexSFLError(f"{api}: the server wants its admin token (401); pass --admin-token-file "
                               "with the file given to `flexsfl serve --admin-token-file`") from None
        if e.code == 403:
            raise FlexSFLError(f"{api}: this server shows its status to loopback only (403); run `flexsfl status` "
                               "on the server, or restart it with --admin-token-file") from None
        raise FlexSFLError(f"{api}: HTTP {e.code} {e.reason}; is this a flexsfl server?") from None
    except (urllib.error.URLError, OSError) as e:
        why = getattr(e, "reason", None) or e
        raise FlexSFLError(f"{api}: cannot reach the server ({why}); is `flexsfl serve` running there?") from None
    try:
        status = json.loads(body)
        status["round"], status["clients"]  # noqa: B018 - the fields every view needs
    except (ValueError, KeyError, TypeError):
        raise FlexSFLError(f"{api}: the answer is not a flexsfl status document; is this a flexsfl server?") from None
    return status


def _bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "–"


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    return f"{s:.0f} s ago" if s < 60 else f"{s / 60:.0f} min ago" if s < 3600 else f"{s / 3600:.0f} h ago"


def _num(v: float | None, fmt: str) -> str:
    return "–" if v is None else format(v, fmt)


def render(status: dict[str, Any], *, now: float | None = None) -> Group:
    """The status as rich renderables: a headline, the clients table and the last rounds."""
    now = time.time() if now is None else now
    srv, r, tot = status.get("server", {}), status["round"], status.get("totals", {})
    total = f"/{r['rounds_total']}" if r.get("rounds_total") else ""
    if r["phase"] == "training" and r.get("steps_expected"):
        progress = f"round {r['id']}: {r['steps_done']} of {r['steps_expected']} steps, {len(r['clients'])} clients"
    else:
        progress = f"round {r['id']}: {r['phase']}"
    refused = sum(tot.get("refused", {}).values())
    head = Text.assemble(
        ("flexsfl ", "bold"), f"{srv.get('model', '?')} · {srv.get('strategy', '?')} · ", (r["phase"], "bold cyan"),
        f"\nrounds done {r['id']}{total} · {progress}\n",
        f"clients {tot.get('connected', 0)}/{tot.get('registered', 0)} connected · steps {tot.get('steps', 0)} · "
        f"refused {refused} · bytes in/out {_bytes(tot.get('bytes_in'))} / {_bytes(tot.get('bytes_out'))}",
    )
    clients = Table(title="clients", title_justify="left")
    for name, justify in (("client", "left"), ("connected", "left"), ("split", "left"), ("backend", "left"),
                          ("target", "left"), ("last seen", "left"), ("steps (round)", "right"), ("step ms p50", "right"),
                          ("personal", "right"), ("bytes in / out", "right")):
        clients.add_column(name, justify=justify, no_wrap=True)
    for c in status["clients"]:
        personal = (f"{100 * c['personal_acc']:.1f} %" if c.get("personal_acc") is not None
                    else f"ppl {c['perplexity']:.1f}" if c.get("perplexity") is not None else "–")
        clients.add_row(
            c["id"], Text("yes", "green") if c["connected"] else Text("no", "red"),
            "–" if c.get("split") is None else f"s={c['split']} ({c.get('topology', 'head/tail')})",
            c.get("backend") or "–", c.get("target") or "–", _ago(c.get("last_seen"), now), str(c.get("steps_round", 0)),
            _num(c.get("step_ms_p50"), ".1f"), personal, f"{_bytes(c.get('bytes_in'))} / {_bytes(c.get('bytes_out'))}",
        )
    rounds = Table(title=f"last {_HISTORY_ROWS} rounds", title_justify="left")
    for name in ("round", "seconds", "personal acc", "loss", "client ms", "server ms", "wire ms", "dropped"):
        rounds.add_column(name, justify="left" if name == "dropped" else "right")
    for h in status.get("history", [])[-_HISTORY_ROWS:]:
        acc = h.get("personal_acc")
        rounds.add_row(str(h["round"]), _num(h.get("seconds"), ".1f"), "–" if acc is None else f"{100 * acc:.1f} %",
                       _num(h.get("loss"), ".4f"), _num(h.get("client_compute_ms"), ".1f"), _num(h.get("server_ms"), ".1f"),
                       _num(h.get("wire_ms"), ".1f"), ", ".join(h.get("dropped") or []) or "–")
    return Group(head, clients, rounds)


def _run(args: argparse.Namespace) -> int:
    token = read_admin_token(args.admin_token_file) if args.admin_token_file else None
    console = Console()
    if args.json:
        print(json.dumps(fetch_status(args.url, token=token, ca_file=args.ca_file), indent=2, sort_keys=True))
        return 0
    if not args.watch:
        console.print(render(fetch_status(args.url, token=token, ca_file=args.ca_file)))
        return 0
    from rich.live import Live

    with Live(console=console, auto_refresh=False, screen=False) as live:
        while True:  # until Ctrl-C
            live.update(render(fetch_status(args.url, token=token, ca_file=args.ca_file)), refresh=True)
            time.sleep(args.watch)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="show a running server's rounds and clients (its /api/status) as tables")
    p.add_argument("url", help="the server: host:port, ws://host:port or https://host:port")
    p.add_argument("--admin-token-file", help="the operator token the server was started with (--admin-token-file)")
    p.add_argument("--ca-file", help="CA certificate to trust for an https:// (wss) server with its own certificate")
    p.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="refresh every SECONDS until Ctrl-C")
    p.add_argument("--json", action="store_true", help="print the raw status document instead of tables")
    p.set_defaults(func=_run)
