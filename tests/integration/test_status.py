"""The server's status page, Prometheus metrics and health checks, against real processes.

One ``flexsfl serve`` (listening on every interface, no admin token) and two ``flexsfl edge run``
clients at splits 1 and 2 train a few rounds over loopback; the server lingers after the last
round so the final counts can be scraped. Headless Chromium watches the page while they train;
``/metrics`` is checked against what the clients reported of their own work (steps, bytes). A
second server with ``--admin-token-file`` checks that nothing but ``/healthz`` answers without
the token.
"""

from __future__ import annotations

import asyncio
import base64
import json
import pathlib
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

from flexsfl.core.wire import Bye, Metrics

from .cdp import Browser, chromium_path
from .harness import ROOT, env, events, finish, flexsfl, free_port, wait_listening
from .reference import LABELS, bundle, make_work

ROUNDS, STEPS, SPLITS = 4, 5, {"a": 1, "b": 3}  # splits shared with test_split_equivalence's bundles


def get(url: str, *, auth: str | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers={"Authorization": auth} if auth else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


class Federation:
    """A lingering server and (once started) two clients; see the module docstring."""

    def __init__(self, work: dict, root: pathlib.Path) -> None:
        from flexsfl.edge_runtime.data import read_examples, write_jsonl
        from flexsfl.server_backend.clients import add_client

        self.work, self.root = work, root
        reg = root / "clients.json"
        self.tokens = {}
        for cid in SPLITS:
            self.tokens[cid] = add_client(reg, cid)
            (root / f"{cid}.token").write_text(self.tokens[cid])
            test = root / f"{cid}-test.jsonl"
            write_jsonl(test, read_examples(work["data"][cid])[:8])
        self.port = free_port()
        self.state = root / "state"
        log = root / "server.log"
        self.server = flexsfl("serve", "--model", str(work["model"]), "--num-labels", str(LABELS), "--host", "0.0.0.0",
                              "--port", str(self.port), "--clients", str(reg), "--state-dir", str(self.state),
                              "--rounds", str(ROUNDS), "--local-steps", str(STEPS), "--batch-size", "4", "--min-clients", "2",
                              "--threads", "1", "--linger", "600", log=log)
        self.procs = {"server": (self.server, log)}
        wait_listening(self.port, self.server, log)
        self.clients: dict = {}

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def start_clients(self) -> None:
        if self.clients:
            return
        for cid, split in SPLITS.items():
            clog = self.root / f"{cid}.log"
            self.clients[cid] = (flexsfl(
                "edge", "run", "--bundle", str(bundle(self.work, split, "ort")), "--server", f"ws://127.0.0.1:{self.port}",
                "--data", str(self.work["data"][cid]), "--test-data", str(self.root / f"{cid}-test.jsonl"),
                "--client-id", cid, "--token-file", str(self.root / f"{cid}.token"), "--backend", "ort", "--threads", "1",
                "--state-dir", str(self.root / f"state-{cid}"), "--max-retries", "3", log=clog), clog)

    def finish_clients(self) -> None:
        self.start_clients()
        finish(self.clients, timeout=600)

    def close(self) -> None:
        for p, _ in [*self.procs.values(), *self.clients.values()]:
            if p.poll() is None:
                p.kill()
                p.wait()


@pytest.fixture(scope="module")
def fed(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    work = make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles)
    for split in SPLITS.values():
        bundle(work, split, "ort")  # exported before the server's clock starts
    f = Federation(work, tmp_path_factory.mktemp("status"))
    yield f
    f.close()


# The clients table as the page shows it: [[client id, split cell], ...].
ROWS = "[...document.querySelectorAll('#clients tbody tr')].map(tr => [tr.dataset.client, tr.querySelector('td.split').textContent])"


def test_status_page_in_headless_chromium(fed, tmp_path):
    path, why = chromium_path()
    if path is None:
        pytest.skip(why)

    async def watch() -> tuple[list, int, int, pathlib.Path]:
        async with Browser(path, tmp_path, width=1100, height=1000) as b:
            await b.goto(fed.url("/"))
            await b.wait_for("document.getElementById('phase').textContent === 'waiting'", 60, "the first status")
            first = int(await b.evaluate("document.getElementById('round').textContent"))
            fed.start_clients()
            both = (f"(() => {{ const r = {ROWS}; return r.filter(x => x[1].startsWith('s=')).length === 2 ? r : null }})()")
            rows = await b.wait_for(both, 180, "both clients with their splits")
            await b.wait_for(f"Number(document.getElementById('round').textContent) > {first}", 180,
                             "the round counter to advance")
            await b.wait_for("document.getElementById('phase').textContent === 'finished'", 300, "the last round")
            last = int(await b.evaluate("document.getElementById('round').textContent"))
            await asyncio.sleep(2.5)  # one more poll: the charts hold the last round's reports
            return rows, first, last, await b.screenshot(tmp_path / "status-page.png")

    rows, first, last, shot = asyncio.run(watch())
    assert sorted(rows) == [[c, f"s={s} (head/tail)"] for c, s in sorted(SPLITS.items())]
    assert first == 0 and last == ROUNDS
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, len(png)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_metrics_match_what_the_clients_did(fed):
    fed.finish_clients()
    status, headers, body = get(fed.url("/metrics"))
    assert status == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    m = _samples(body.decode())
    reported = events(fed.state, "client_metrics")
    for cid in SPLITS:
        mine = [e for e in reported if e["client"] == cid]
        assert [e["round"] for e in mine] == list(range(ROUNDS))
        client = (("client", cid),)
        assert m[("flexsfl_steps_total", client)] == sum(e["metrics"]["steps"] for e in mine) == ROUNDS * STEPS
        # Every message each side counted: the client's count at its last report, plus that
        # report itself (in) or the server's Bye after it (out).
        last = said = mine[-1]["metrics"]
        assert m[("flexsfl_bytes_received_total", client)] == last["bytes_sent"] + len(
            Metrics(round_id=ROUNDS - 1, metrics=said).serialize())
        assert m[("flexsfl_bytes_sent_total", client)] == last["bytes_received"] + len(
            Bye(reason="training finished").serialize())
        assert m[("flexsfl_client_compute_seconds_count", client)] == ROUNDS
        assert m[("flexsfl_client_compute_seconds_sum", client)] == pytest.approx(
            sum(e["metrics"]["client_compute_ms"] for e in mine) / 1e3)
        assert m[("flexsfl_wire_seconds_count", client)] == ROUNDS
        assert m[("flexsfl_client_personal_accuracy", client)] == pytest.approx(last["personal_acc"])
    assert m[("flexsfl_server_step_seconds_count", ())] == m[("flexsfl_step_batch_size_count", ())] == 2 * ROUNDS * STEPS
    assert m[("flexsfl_step_batch_size_sum", ())] == 4 * 2 * ROUNDS * STEPS
    assert m[("flexsfl_rounds_total", ())] == ROUNDS
    assert m[("flexsfl_round", ())] == ROUNDS
    assert m[("flexsfl_round_phase", (("flexsfl_round_phase", "finished"),))] == 1
    assert m[("flexsfl_clients_connected", ())] == 0 and m[("flexsfl_clients_registered", ())] == 2
    assert m[("flexsfl_compute_queue_depth", ())] == 0
    # the JSON status agrees, and holds no client token
    status, _, body = get(fed.url("/api/status"))
    s = json.loads(body)
    assert {c["id"]: c["steps_total"] for c in s["clients"]} == {"a": ROUNDS * STEPS, "b": ROUNDS * STEPS}
    assert [h["round"] for h in s["history"]] == list(range(ROUNDS))
    assert s["round"]["phase"] == "finished" and s["round"]["rounds_done"] == ROUNDS
    _, _, page = get(fed.url("/"))
    for token in fed.tokens.values():
        assert token.encode() not in body and token.encode() not in page
    assert get(fed.url("/readyz"))[0] == 200 and get(fed.url("/healthz"))[:3:2] == (200, b"ok\n")
    # the same status in a terminal
    out = _status_cli(f"ws://127.0.0.1:{fed.port}")
    assert out.returncode == 0, out.stderr
    assert f"rounds done {ROUNDS}/{ROUNDS}" in out.stdout and "finished" in out.stdout
    for cid, split in SPLITS.items():
        assert f" {cid} " in out.stdout and f"s={split} (head/tail)" in out.stdout


def _status_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flexsfl", "status", *args], capture_output=True, text=True, timeout=60,
                          env=env({"COLUMNS": "200"}), cwd=ROOT)


def _own_address() -> str | None:
    """This machine's address on its default route (not loopback), if it has one."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # UDP: no packet is sent
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") else ip


def test_without_admin_token_only_loopback_sees_the_status(fed):
    ip = _own_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to connect from")
    status, _, body = get(f"http://{ip}:{fed.port}/api/status")
    assert status == 403 and b"--admin-token-file" in body and b"clients" not in body
    assert get(f"http://{ip}:{fed.port}/healthz")[0] == 200


def test_admin_token_guards_every_endpoint_but_healthz(tmp_path, tiny_model_dirs):
    from flexsfl.server_backend.clients import add_client

    admin = "op-" + base64.urlsafe_b64encode(bytes(range(24))).decode()
    (tmp_path / "admin.token").write_text(admin + "\n")
    reg = tmp_path / "clients.json"
    client_token = add_client(reg, "a")
    port = free_port()
    log = tmp_path / "server.log"
    server = flexsfl("serve", "--model", str(tiny_model_dirs["llama"]), "--num-labels", str(LABELS), "--port", str(port),
                     "--clients", str(reg), "--state-dir", str(tmp_path / "state"), "--rounds", "1", "--threads", "1",
                     "--admin-token-file", str(tmp_path / "admin.token"), log=log)
    try:
        wait_listening(port, server, log)
        base = f"http://127.0.0.1:{port}"
        assert get(base + "/healthz")[:3:2] == (200, b"ok\n")
        basic = lambda pw: "Basic " + base64.b64encode(f"operator:{pw}".encode()).decode()  # noqa: E731
        for path in ("/", "/api/status", "/metrics", "/readyz"):
            for auth in (None, "Bearer wrong-token-0123456789", "Bearer " + admin[:-1], basic("nope"), admin, "Bearer"):
                status, headers, body = get(base + path, auth=auth)
                assert (status, body) == (401, b"unauthorized\n"), (path, auth, status, body[:200])
                assert headers["WWW-Authenticate"].startswith("Basic")
            for auth in ("Bearer " + admin, basic(admin)):
                status, _, body = get(base + path, auth=auth)
                assert status == 200, (path, auth, status)
                assert admin.encode() not in body and client_token.encode() not in body
        no_token = _status_cli(base)
        assert no_token.returncode == 2 and "(401)" in no_token.stderr and len(no_token.stderr.splitlines()) == 1
        ok = _status_cli(base, "--admin-token-file", str(tmp_path / "admin.token"))
        assert ok.returncode == 0 and "waiting" in ok.stdout, ok.stderr
    finally:
        server.kill()
        server.wait()
