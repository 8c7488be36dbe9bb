"""A misbehaving client is refused with clear errors while another client's training goes on unchanged.

Real processes: ``flexsfl serve``, a good ``flexsfl edge run`` (ORT backend) and ``bad_client.py``,
which joins the round and sends NaN activations, then tries garbage bytes, a text frame, a wrong
token, an unknown id, a bundle for another model, a wrong hidden size, an out-of-order upload and
an oversized frame, each on a fresh connection. Each gets the right error code and close code; the
good client's result equals the eager reference of a round without the bad client.
"""

from __future__ import annotations

import json
import sys
import time

import pytest

from flexsfl.core.bundle import load_bundle

from .harness import ROOT, env, events
from .reference import STEPS, bundle, check, federate, make_work, order, reference

EXPECTED = {
    "nan_activations": ({"NON_FINITE"}, 1003),
    "wrong_token": ({"UNAUTHORIZED"}, 1008),
    "unknown_client": ({"UNAUTHORIZED"}, 1008),
    "other_model": ({"BUNDLE_MISMATCH"}, 1008),
    "garbage_first": ({"MALFORMED_FRAME", "BAD_VERSION", "TOO_LARGE"}, None),
    "text_frame": ({"MALFORMED_FRAME"}, 1002),
    "garbage_after_hello": ({"MALFORMED_FRAME", "TOO_LARGE"}, None),
    "wrong_shape": ({"BAD_TENSOR"}, 1003),
    "upload_out_of_order": ({"OUT_OF_ORDER"}, 1002),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    return make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles)


def test_bad_client_is_refused_and_good_client_unaffected(work, tmp_path):
    import subprocess

    b = load_bundle(bundle(work, 2, "ort"))
    m = b.manifest
    report = tmp_path / "bad.json"

    def start_bad(port, procs):
        log = tmp_path / "bad.log"
        p = subprocess.Popen([sys.executable, str(ROOT / "tests" / "integration" / "bad_client.py"), str(port), "mallory",
                              str(tmp_path / "mallory.token"), m.layout_hash, str(m.split), str(m.model.hidden_size),
                              str(report)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
        procs["bad"] = (p, log)
        # let it finish its attacks that need no round before the good client arrives
        deadline = time.time() + 120
        while not (tmp_path / "bad.log").read_text().count("joined") and p.poll() is None and time.time() < deadline:
            time.sleep(0.2)

    state = federate(work, tmp_path, [("a", 2, "ort")], min_clients=2, before_clients=start_bad, register=("mallory",))
    results = json.loads(report.read_text())
    for attack, (codes, close) in EXPECTED.items():
        got = results[attack]
        assert got.get("code") in codes, (attack, got)
        assert "\n" not in got["message"] and len(got["message"]) > 20, (attack, got)
        if close is not None:
            assert got.get("close") == close, (attack, got)
    assert results["oversized"].get("close") == 1009, results["oversized"]
    assert "NaN" in results["nan_activations"]["message"] or "finite" in results["nan_activations"]["message"]
    refused = events(state, "refused")
    assert len(refused) >= len(EXPECTED)
    # the good client trained its 10 steps, alone on the model, and its result is unchanged
    steps = order(state)
    assert steps == [("a", i) for i in range(STEPS)]
    check(state, reference(work, [("a", 2, "ort")], steps))
    rounds = events(state, "round")
    assert rounds[0]["clients"] == ["a"] and "mallory" in rounds[0]["dropped"]


def test_client_started_before_the_server_retries_with_backoff(work, tmp_path):
    """A device that comes up before the server keeps retrying, then trains when it appears."""
    from flexsfl.server_backend.clients import add_client

    from .harness import finish, flexsfl, free_port, wait_listening
    from .reference import LABELS

    reg = tmp_path / "clients.json"
    (tmp_path / "a.token").write_text(add_client(reg, "a"))
    port = free_port()
    clog = tmp_path / "a.log"
    client = flexsfl("edge", "run", "--bundle", str(bundle(work, 2, "ort")), "--server", f"ws://127.0.0.1:{port}",
                     "--data", str(work["data"]["a"]), "--client-id", "a", "--token-file", str(tmp_path / "a.token"),
                     "--backend", "ort", "--threads", "1", "--state-dir", str(tmp_path / "state-a"), "--max-retries", "30",
                     log=clog)
    deadline = time.time() + 60
    while clog.read_text().count("retrying in") < 2 and time.time() < deadline:
        assert client.poll() is None, clog.read_text()[-2000:]
        time.sleep(0.2)
    assert clog.read_text().count("retrying in") >= 2
    slog = tmp_path / "server.log"
    server = flexsfl("serve", "--model", str(work["model"]), "--num-labels", str(LABELS), "--port", str(port),
                     "--clients", str(reg), "--state-dir", str(tmp_path / "state"), "--rounds", "1", "--local-steps", "3",
                     "--batch-size", "4", "--threads", "1", log=slog)
    wait_listening(port, server, slog)
    finish({"server": (server, slog), "client": (client, clog)}, timeout=300)
    assert "done: 1 rounds" in clog.read_text()
    assert events(tmp_path / "state", "round")[0]["clients"] == ["a"]
