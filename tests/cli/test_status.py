"""``flexsfl status``: the URL forms it takes, the tables it prints, and its one-line errors.

The live server is in tests/integration/test_status.py; here the status document comes from a
real :class:`Fleet` fed the server's events.
"""

from __future__ import annotations

import socket

import pytest
from rich.console import Console

from flexsfl.cli.main import main
from flexsfl.cli.status import fetch_status, render, status_url
from flexsfl.core.errors import ConfigError, FlexSFLError
from flexsfl.server_backend.fleet import Fleet


@pytest.mark.parametrize("given, want", [
    ("ws://10.0.0.2:8765", "http://10.0.0.2:8765/api/status"),
    ("wss://srv.example:443/", "https://srv.example:443/api/status"),
    ("https://srv:8765/anything?x=1", "https://srv:8765/api/status"),
    ("127.0.0.1:8765", "http://127.0.0.1:8765/api/status"),
])
def test_status_url_accepts_the_addresses_an_operator_has(given, want):
    assert status_url(given) == want


def test_status_url_refuses_what_is_not_a_server():
    with pytest.raises(ConfigError, match="not a server address"):
        status_url("ftp://host:21")


def test_render_shows_round_clients_and_history():
    fleet = Fleet(rounds_total=10, local_steps=4, registered=["pi-kitchen", "jetson"])
    fleet.observe("phase", {"phase": "training", "round": 3, "clients": ["pi-kitchen"]})
    fleet.observe("hello", {"client": "pi-kitchen", "split": 2, "backend": "ort", "profile": {"target": "rpi5"}})
    fleet.observe("step", {"client": "pi-kitchen", "round": 3, "step": 0, "loss": 0.7, "server_ms": 5.0})
    fleet.observe("client_metrics", {"client": "pi-kitchen", "round": 2, "metrics": {"personal_acc": 0.812, "loss": 0.5}})
    status = fleet.snapshot({"pi-kitchen": (2_500_000, 1_200_000)}, extra={"model": "minilm", "strategy": "flexpsfl"})
    console = Console(width=200, record=True)
    console.print(render(status, now=status["server"]["started"] + 5))
    out = console.export_text()
    assert "rounds done 3/10" in out and "round 3: 1 of 4 steps, 1 clients" in out
    line = next(x for x in out.splitlines() if "pi-kitchen" in x)
    for cell in ("yes", "s=2 (head/tail)", "ort", "rpi5", "81.2 %", "2.5 MB / 1.2 MB"):
        assert cell in line, (cell, line)
    assert "jetson" in out and next(x for x in out.splitlines() if "jetson" in x).count("–") >= 4


def test_unreachable_server_is_one_line(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(FlexSFLError, match="cannot reach the server"):
        fetch_status(f"127.0.0.1:{port}", timeout=5)
    assert main(["status", f"ws://127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("flexsfl status: error:") and "is `flexsfl serve` running there?" in err and "\n" not in err
