"""A bad dL/dH is refused with a one-line error, changes nothing, and the round goes on.

Five misbehaving U-shaped clients (``bad_u_client.py``, one process) join round 0 beside a real
``flexsfl edge run`` client and answer the middle's H with dL/dH of the wrong shape, with a NaN,
for a step never sent, or after the middle's deadline (``--middle-ttl``; the deadline is kept by
the server's timer, logged as ``u_expired`` before the late frame arrives), or send Z' in a
round without ``--align-top``. Each gets an Error with a one-line reason and a close; none of
their steps reaches the middle's optimizer; and the good client's personal model and the
server's global model equal the eager reference trained on the good client's batches alone
(rel err <= 1e-4).
"""

from __future__ import annotations

import json
import subprocess
import sys

from .harness import ROOT, env, events
from .u_reference import STEPS, check_u, federate_u, reference_u, replay

TTL = 2.0
WANT = {
    "shape": ("BAD_TENSOR", "TopGradients.grad_h has shape [2, 5, 64], but z had [2, 6, 64]"),
    "nan": ("NON_FINITE", "grad_h"),
    "unknown": ("OUT_OF_ORDER", "TopGradients answers round 0 step 5, but the outstanding Activations is round 0 step 0"),
    "late": ("BAD_TENSOR", "arrived after the deadline"),
    "zref": ("BAD_TENSOR", "carries z_ref (Z') in round 0, whose RoundConfig has align_top false"),
}


def test_bad_dl_dh_is_refused_and_changes_nothing(tmp_path, u_models, u_bundles, u_data):
    bundle = u_bundles("bert", 1, 1, "ort")
    out = tmp_path / "bad.json"
    bad = {}

    def start_bad(port, procs):
        log = tmp_path / "bad.log"
        bad["p"] = subprocess.Popen([sys.executable, "-m", "tests.integration.bad_u_client", str(port), str(bundle),
                                     str(tmp_path), str(TTL), str(out)], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                    env=env(), cwd=ROOT)
        procs["bad"] = (bad["p"], log)

    state = federate_u(u_models["bert"], u_data, tmp_path, [("a", bundle, "ort")], min_clients=1 + len(WANT), before_clients=start_bad,
                       register=tuple(f"x-{c}" for c in WANT), serve_args=("--middle-ttl", str(TTL)))
    got = json.loads(out.read_text())
    for case, (code, text) in WANT.items():
        r = got[case]
        assert r.get("code") == code and text in r.get("message", ""), (case, r)
        assert "\n" not in r["message"] and r.get("close") not in (None, 1000) and not r.get("other"), (case, r)
    expired = [(e["client"], e["step"]) for e in events(state, "u_expired")]
    assert ("x-late", 0) in expired
    log = replay(state)
    assert not [x for x in log if x[0] == "step" and x[1].startswith("x-")]  # no bad step reached the optimizer
    assert [x for x in log if x[0] == "step"] == [("step", "a", i) for i in range(STEPS)]
    check_u(state, reference_u(u_models["bert"], u_data, {"a": (1, 1)}, bundle, log))
