"""A bad Z' in an ``--align-top`` round is refused with a one-line error, changes nothing, and the
round goes on.

Three misbehaving U-shaped clients (``bad_u_align_client.py``, one process) join round 0 of a
``flexsfl serve --align-top`` beside a real ``flexsfl edge run`` client and send Z' of another
shape than Z, Z' with a NaN, or Z' on an eval step. Each gets an Error with a one-line reason
and a close; none of their steps reaches the middle; and the good client's personal model and
the global model equal the eager reference with both alignment terms, trained on the good
client's batches alone (rel err <= 1e-4). (Z' in a round without align_top: ``test_u_bad_input``.)
"""

from __future__ import annotations

import json
import subprocess
import sys

from .harness import ROOT, env, events, free_port
from .u_reference import STEPS, Recorder, check_u, federate_u, reference_u, replay, wire_steps

LAM = 0.5
WANT = {
    "shape": ("BAD_TENSOR", "Activations.z_ref has shape [2, 5, 64], z has [2, 6, 64]"),
    "nan": ("NON_FINITE", "z_ref"),
    "eval": ("BAD_TENSOR", "carries z_ref (Z') in an eval step"),
}


def test_bad_z_ref_is_refused_and_changes_nothing(tmp_path, u_models, u_bundles, u_data):
    bundle = u_bundles("bert", 1, 1, "ort")
    out = tmp_path / "bad.json"

    def start_bad(port, procs):
        log = tmp_path / "bad.log"
        p = subprocess.Popen([sys.executable, "-m", "tests.integration.bad_u_align_client", str(port), str(bundle),
                              str(tmp_path), str(out)], stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(), cwd=ROOT)
        procs["bad"] = (p, log)

    server_port = free_port()
    proxy = Recorder(server_port)  # the good client's Z, Z', H, H' for the reference (the bad ones connect directly)
    try:
        state = federate_u(u_models["bert"], u_data, tmp_path, [("a", bundle, "ort")], min_clients=1 + len(WANT),
                           before_clients=start_bad, register=tuple(f"x-{c}" for c in WANT),
                           serve_args=("--align-lambda", str(LAM), "--align-top"), server_port=server_port, port=proxy.port)
    finally:
        proxy.stop()
    got = json.loads(out.read_text())
    for case, (code, text) in WANT.items():
        r = got[case]
        assert r.get("align_top") is True, (case, r)
        assert r.get("code") == code and text in r.get("message", ""), (case, r)
        assert "\n" not in r["message"] and r.get("close") not in (None, 1000) and not r.get("other"), (case, r)
    assert [e["client"] for e in events(state, "u_reference")] == ["a"] * STEPS
    log = replay(state)
    assert not [x for x in log if x[1].startswith("x-")]  # no bad step reached the middle
    assert [x for x in log if x[0] == "step"] == [("step", "a", i) for i in range(STEPS)]
    check_u(state, reference_u(u_models["bert"], u_data, {"a": (1, 1)}, bundle, log, align=LAM, wire=wire_steps(proxy)))
