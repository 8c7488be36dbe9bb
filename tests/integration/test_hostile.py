"""One bad device, or anyone who can reach the port, cannot wreck the federation.

Real processes over loopback: ``flexsfl serve``, an honest ``flexsfl edge run`` (ORT) and
``bad_client.py`` in one of its in-round modes, or raw websockets from this test. Each test is one
defect of issue 11: a poisoned upload, replayed/extra steps, a 50 MB frame before Hello, sockets
beyond the cap, token rotation on a running server, a silent client, and garbage state files.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import struct
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import save_file
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from flexsfl.core.bundle import load_bundle
from flexsfl.core.wire import Connection, Hello, Metrics, Role, Welcome, parse
from flexsfl.server_backend.clients import add_client

from .harness import ROOT, env, events, finish, flexsfl, free_port, load_global, wait_listening
from .reference import BATCH, LABELS, LR, bundle, make_work

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    return make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles)


def _serve(work, tmp_path, *, ids=("a",), rounds=1, min_clients=1, steps=4, extra=()):
    reg = tmp_path / "clients.json"
    for cid in ids:
        (tmp_path / f"{cid}.token").write_text(add_client(reg, cid))
    port = free_port()
    log = tmp_path / "server.log"
    server = flexsfl("serve", "--model", str(work["model"]), "--num-labels", str(LABELS), "--port", str(port),
                     "--clients", str(reg), "--state-dir", str(tmp_path / "state"), "--rounds", str(rounds),
                     "--local-steps", str(steps), "--batch-size", str(BATCH), "--lr", str(LR), "--optimizer", "sgd",
                     "--no-batching", "--threads", "1", "--min-clients", str(min_clients), *extra, log=log)
    wait_listening(port, server, log)
    return port, {"server": (server, log)}


def _edge(work, tmp_path, port, cid="a"):
    log = tmp_path / f"{cid}.log"
    return flexsfl("edge", "run", "--bundle", str(bundle(work, 2, "ort")), "--server", f"ws://127.0.0.1:{port}",
                   "--data", str(work["data"][cid]), "--client-id", cid, "--token-file", str(tmp_path / f"{cid}.token"),
                   "--backend", "ort", "--threads", "1", "--state-dir", str(tmp_path / f"state-{cid}"), "--seed", "0",
                   "--max-retries", "3", log=log), log


def _bad(work, tmp_path, port, mode):
    m = load_bundle(bundle(work, 2, "ort")).manifest
    log = tmp_path / "bad.log"
    p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "bad_client.py"), str(port), "mallory",
                          str(tmp_path / "mallory.token"), m.layout_hash, str(m.split), str(m.model.hidden_size),
                          str(tmp_path / "bad.json"), mode], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
    return p, log


def _wait_for(pred, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_poisoned_upload_leaves_the_global_model_bit_identical(work, tmp_path):
    clean_dir, bad_dir = tmp_path / "clean", tmp_path / "poisoned"
    clean_dir.mkdir()
    bad_dir.mkdir()
    port, procs = _serve(work, clean_dir)
    procs["a"] = _edge(work, clean_dir, port)
    finish(procs, timeout=600)

    port, procs = _serve(work, bad_dir, ids=("a", "mallory"), min_clients=2)
    procs["bad"] = _bad(work, bad_dir, port, "poison")
    procs["a"] = _edge(work, bad_dir, port)
    finish(procs, timeout=600)
    got = json.loads((bad_dir / "bad.json").read_text())["poison"]
    assert got["code"] == "BAD_TENSOR" and "num_samples" in got["message"] and got["close"] == 1003, got
    rounds = events(bad_dir / "state", "round")
    assert rounds[0]["clients"] == ["a"] and rounds[0]["dropped"] == ["mallory"]
    clean, poisoned = load_global(clean_dir / "state"), load_global(bad_dir / "state")
    assert set(clean) == set(poisoned)
    for n in clean:
        assert clean[n].tobytes() == poisoned[n].tobytes(), n  # bit-identical
    assert all(np.isfinite(a).all() and np.abs(a).max() < 1e3 for a in poisoned.values())


def test_replayed_and_extra_steps_are_refused_and_change_nothing(work, tmp_path):
    port, procs = _serve(work, tmp_path, ids=("mallory",), rounds=3, steps=4)
    procs["bad"] = _bad(work, tmp_path, port, "replay")
    finish(procs, timeout=300)
    got = json.loads((tmp_path / "bad.json").read_text())
    assert got["first_step"] == "Gradients"
    assert got["replayed_step"]["code"] == "OUT_OF_ORDER" and "already served" in got["replayed_step"]["message"]
    assert got["extra_step"]["code"] == "OUT_OF_ORDER" and "outside 0..3" in got["extra_step"]["message"]
    assert got["huge_step_id"]["code"] == "OUT_OF_ORDER" and got["huge_step_id"]["close"] == 1002
    steps = events(tmp_path / "state", "step")
    assert [(s["round"], s["step"]) for s in steps] == [(0, 0)]  # the one step served, trained once


async def _raw_frame(port: int, nbytes: int) -> int | None:
    """An attacker without a websocket library: upgrade, then a binary frame of ``nbytes`` before any Hello.

    Returns the close code the server sent (read after the header and the first MiB), then keeps
    streaming the rest of the frame as long as the server takes it.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    chunk = bytes(1 << 20)  # mask key 0: the payload goes as is
    writer.write(bytes([0x82, 0xFF]) + struct.pack(">Q", nbytes) + bytes(4) + b"FSFL" + chunk[: min(nbytes, 1 << 20) - 4])
    await writer.drain()
    code = None
    try:
        head = await asyncio.wait_for(reader.readexactly(4), 5)
        if head[0] == 0x88:
            code = struct.unpack(">H", head[2:4])[0]
        sent = 1 << 20
        while sent < nbytes:
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
    except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        pass
    writer.close()
    return code


async def _pre_auth_frame(port: int, nbytes: int) -> tuple[float, int | None]:
    """Send a frame of ``nbytes`` before Hello while another socket pings; (worst ping ms, close code)."""
    async with connect(f"ws://127.0.0.1:{port}", compression=None) as other:
        await other.ping()
        worst = 0.0
        stop = asyncio.Event()

        async def pinger():
            nonlocal worst
            while not stop.is_set():
                t0 = time.perf_counter()
                await asyncio.wait_for(await other.ping(), 5)
                worst = max(worst, 1e3 * (time.perf_counter() - t0))
                await asyncio.sleep(0.01)

        task = asyncio.create_task(pinger())
        code = await _raw_frame(port, nbytes)
        await asyncio.sleep(0.3)
        stop.set()
        await task
        return worst, code


def _rss_kb(pid: int) -> int:
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_pre_auth_frame_costs_little_and_the_loop_keeps_answering(work, tmp_path):
    port, procs = _serve(work, tmp_path, min_clients=5)
    server = procs["server"][0]
    try:
        asyncio.run(_pre_auth_frame(port, 1 << 20))  # warm up the code paths once
        before = _rss_kb(server.pid)
        worst, code = asyncio.run(_pre_auth_frame(port, 50 << 20))
        grown = _rss_kb(server.pid) - before
        assert code == 1009, code
        assert grown < 5 * 1024, f"server RSS grew by {grown} kB for one 50 MB pre-auth frame"
        assert worst < 50, f"another client's ping took {worst:.1f} ms"
    finally:
        server.kill()
        server.wait()


async def _hold(port: int, n: int) -> list:
    return [await connect(f"ws://127.0.0.1:{port}", compression=None) for _ in range(n)]


async def _closed_code(ws) -> int | None:
    """Read until the server closes (an Error frame may come first); its close code."""
    try:
        while True:
            await asyncio.wait_for(ws.recv(), 5)
    except ConnectionClosed as e:
        return e.rcvd.code if e.rcvd else None


def test_pre_auth_sockets_beyond_the_cap_are_refused(work, tmp_path):
    port, procs = _serve(work, tmp_path, min_clients=5, extra=("--max-unauthenticated", "4"))
    server = procs["server"][0]

    async def go():
        held = await _hold(port, 4)
        extra = await _hold(port, 3)
        codes = [await _closed_code(ws) for ws in extra]
        for ws in held:
            await ws.ping()  # still open, answered
        for ws in held + extra:
            await ws.close()
        await asyncio.sleep(0.3)
        again = await _hold(port, 1)  # slots are given back when sockets close
        await again[0].ping()
        await again[0].close()
        return codes

    try:
        assert asyncio.run(go()) == [1013, 1013, 1013]
        assert "too many connections" in procs["server"][1].read_text()
    finally:
        server.kill()
        server.wait()


async def _hello(port, layout, token, cid="alice"):
    ws = await connect(f"ws://127.0.0.1:{port}", compression=None)
    conn = Connection(Role.CLIENT)
    await ws.send(conn.send(Hello(client_id=cid, token=token, layout_hash=layout, split=2, backend="ort")))
    try:
        msg = conn.receive(await ws.recv())
    except Exception:  # noqa: BLE001 - an Error frame: the caller reads the close code
        msg = None
    return ws, conn, msg


def test_token_rotation_and_revocation_without_restart(work, tmp_path):
    reg = tmp_path / "clients.json"
    port, procs = _serve(work, tmp_path, ids=("alice",), min_clients=5)
    server = procs["server"][0]
    layout = load_bundle(bundle(work, 2, "ort")).manifest.layout_hash
    old = (tmp_path / "alice.token").read_text()

    async def go():
        ws1, conn1, w = await _hello(port, layout, old)
        assert isinstance(w, Welcome)
        new = add_client(reg, "alice", rotate=True)  # what `flexsfl clients add alice --rotate` does
        await ws1.send(conn1.send(Metrics(round_id=0, metrics={"x": 1})))
        assert await _closed_code(ws1) == 1008  # the old session ends at its next message
        ws2, _, w = await _hello(port, layout, old)
        assert not isinstance(w, Welcome) and await _closed_code(ws2) == 1008  # the old token is refused
        ws3, conn3, w = await _hello(port, layout, new)
        assert isinstance(w, Welcome)  # the new one works at once
        data = json.loads(reg.read_text())
        del data["clients"]["alice"]
        reg.write_text(json.dumps(data))  # revoked
        await ws3.send(conn3.send(Metrics(round_id=0, metrics={"x": 1})))
        return await _closed_code(ws3)

    try:
        assert asyncio.run(go()) == 1008
        refused = [e["message"] for e in events(tmp_path / "state", "refused")]
        assert sum("revoked or its token rotated" in m for m in refused) == 2
    finally:
        server.kill()
        server.wait()


def test_a_silent_client_is_dropped_and_the_round_closes(work, tmp_path):
    port, procs = _serve(work, tmp_path, ids=("a", "mallory"), min_clients=2, extra=("--step-timeout", "3"))
    bad = _bad(work, tmp_path, port, "silent")
    procs["a"] = _edge(work, tmp_path, port)
    t0 = time.time()
    finish(procs, timeout=300)
    assert time.time() - t0 < 120  # not the 600 s --round-timeout
    bad[0].wait(timeout=30)
    rounds = events(tmp_path / "state", "round")
    assert rounds[0]["clients"] == ["a"] and rounds[0]["dropped"] == ["mallory"]
    dropped = events(tmp_path / "state", "dropped")
    assert dropped[0]["client"] == "mallory" and "--step-timeout 3" in dropped[0]["reason"]
    assert json.loads((tmp_path / "bad.json").read_text())["silent"]["close"] == 1013
    assert "dropped mallory" in procs["server"][1].read_text()


def test_each_corrupt_state_file_is_refused_in_one_line(work, tmp_path):
    first = tmp_path / "first"
    first.mkdir()
    port, procs = _serve(work, first)
    procs["a"] = _edge(work, first, port)
    finish(procs, timeout=600)
    good = load_global(first / "state")
    name = sorted(good)[0]

    def nan(d):
        save_file({**good, name: np.full_like(good[name], np.nan)}, str(d / "global.safetensors"), metadata={"round_id": "0"})

    damages = {
        "empty": (lambda d: save_file({}, str(d / "global.safetensors"), metadata={"round_id": "0"}), "holds no tensors"),
        "missing": (lambda d: save_file({k: v for k, v in good.items() if k != name}, str(d / "global.safetensors"),
                                        metadata={"round_id": "0"}), f"tensor '{name}' is missing"),
        "nan": (nan, "has non-finite values"),
        "round_id": (lambda d: save_file(good, str(d / "global.safetensors"), metadata={"round_id": "x1"}),
                     "round_id 'x1' is not an integer"),
        "sqlite": (lambda d: (d / "state.sqlite").write_bytes(b"garbage" * 1000), "state.sqlite: not a readable SQLite"),
    }
    import shutil

    for case, (damage, msg) in damages.items():
        d = tmp_path / case
        shutil.copytree(first, d)
        damage(d / "state")
        before = {p.name: p.read_bytes() for p in (d / "state").iterdir() if p.is_file() and p.suffix != ".jsonl"}
        log = d / "server2.log"
        p = subprocess.run([sys.executable, "-m", "flexsfl", "serve", "--model", str(work["model"]), "--num-labels",
                            str(LABELS), "--port", str(free_port()), "--clients", str(first / "clients.json"),
                            "--state-dir", str(d / "state"), "--rounds", "2", "--threads", "1"],
                           capture_output=True, text=True, env=env(), cwd=ROOT, timeout=300)
        log.write_text(p.stderr)
        assert p.returncode == 2, (case, p.stderr[-2000:])
        errors = [line for line in p.stderr.splitlines() if "error:" in line]
        assert len(errors) == 1 and msg in errors[0] and "Traceback" not in p.stderr, (case, p.stderr[-2000:])
        after = {p.name: p.read_bytes() for p in (d / "state").iterdir() if p.is_file() and p.suffix != ".jsonl"}
        assert after == before, case  # nothing overwritten
