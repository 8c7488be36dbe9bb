"""Logit-level alignment (``flexsfl serve --align logit-kl``) over real websockets, with bad Z'.

One ``flexsfl serve --align logit-kl --align-lambda λ`` process, one ``flexsfl edge run`` process
(tiny Llama, split 2, ONNX Runtime, torch blocked) and, in one more process, four misbehaving
head/tail clients (``bad_logit_client.py``) that join the same round and send Z' one token
short, Z' with a NaN, a train step without Z', and Z' on an eval step. Each of those gets an
Error with a one-line reason and a close, and none of their steps reaches the tail. The good
client trains its 10 steps, each with Z' on the wire: the server logs ``align_ratio`` for every
step (λ on each step whose logits differ from the global tail's beyond float32 rounding, 0 on the
round's first ones, while θ is still φ), and the client's round metrics carry the same ratios
(the server's Gradients say what it added; the device adds nothing).
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from flexsfl.server_backend.clients import add_client
from tests.no_torch import sitecustomize_dir

from .harness import ROOT, env, events, finish, flexsfl, free_port, wait_listening
from .reference import BATCH, LR, STEPS, bundle, make_work

pytestmark = pytest.mark.slow  # ~100 s on the shared 2-core machine (bundle export included)

LAM = 0.5
WANT = {
    "shape": ("BAD_TENSOR", "Activations.z_ref has shape [2, 5, "),
    "nan": ("NON_FINITE", "z_ref"),
    "missing": ("BAD_TENSOR", "lacks z_ref (Z')"),
    "eval": ("BAD_TENSOR", "carries z_ref (Z') in an eval step"),
}


@pytest.fixture(scope="module")
def work(tmp_path_factory, tiny_model_dirs, tiny_bundles):
    return make_work(tmp_path_factory, tiny_model_dirs, tiny_bundles)


def test_logit_kl_over_websockets_and_bad_z_ref_is_refused(work, tmp_path):
    b = bundle(work, 2, "ort")
    reg = tmp_path / "clients.json"
    for cid in ["a", *(f"x-{c}" for c in WANT)]:
        (tmp_path / f"{cid}.token").write_text(add_client(reg, cid))
    port, state = free_port(), tmp_path / "state"
    procs = {"server": (flexsfl("serve", "--model", str(work["model"]), "--num-labels", "2", "--port", str(port),
                                "--clients", str(reg), "--state-dir", str(state), "--rounds", "1",
                                "--local-steps", str(STEPS), "--batch-size", str(BATCH), "--lr", str(LR), "--optimizer", "sgd",
                                "--align", "logit-kl", "--align-lambda", str(LAM), "--threads", "1",
                                "--min-clients", str(1 + len(WANT)), log=tmp_path / "server.log"), tmp_path / "server.log")}
    wait_listening(port, procs["server"][0], tmp_path / "server.log")
    out, blog = tmp_path / "bad.json", tmp_path / "bad.log"
    procs["bad"] = (subprocess.Popen([sys.executable, "-m", "tests.integration.bad_logit_client", str(port), str(b),
                                      str(tmp_path), str(out)], stdout=open(blog, "w"), stderr=subprocess.STDOUT, env=env(),
                                     cwd=ROOT), blog)
    blocker = sitecustomize_dir(tmp_path / "notorch", tmp_path / "notorch.mark")
    procs["a"] = (flexsfl("edge", "run", "--bundle", str(b), "--server", f"ws://127.0.0.1:{port}", "--data",
                          str(work["data"]["a"]), "--client-id", "a", "--token-file", str(tmp_path / "a.token"),
                          "--backend", "ort", "--threads", "1", "--state-dir", str(tmp_path / "state-a"), "--seed", "0",
                          "--max-retries", "3", log=tmp_path / "a.log", extra_env={"PYTHONPATH": f"{blocker}:{ROOT}"}),
                  tmp_path / "a.log")
    finish(procs, timeout=600)
    assert (tmp_path / "notorch.mark").read_text().strip()  # the device ran with torch blocked

    import json

    got = json.loads(out.read_text())
    for case, (code, text) in WANT.items():
        r = got[case]
        assert r.get("alignment") == "logit_kl", (case, r)
        assert r.get("code") == code and text in r.get("message", ""), (case, r)
        assert "\n" not in r["message"] and r.get("close") not in (None, 1000) and not r.get("other"), (case, r)
    steps = [t for e in events(state, "batch") for t in e["steps"]]
    assert steps == [f"a:0:{i}" for i in range(STEPS)]  # no bad client's step reached the tail

    ratios = [e["align_ratio"] for e in events(state, "step")]
    assert len(ratios) == STEPS and all(r == 0.0 or r == pytest.approx(LAM, rel=1e-5) for r in ratios), ratios
    assert ratios[0] == 0.0 and sum(r > 0 for r in ratios) >= STEPS - 3  # θ = φ at the first step: nothing to align
    m = next(e["metrics"] for e in events(state, "client_metrics") if e["client"] == "a")
    assert m["aligned_steps"] == STEPS and m["align_ratio"] == pytest.approx(sum(ratios) / STEPS, rel=1e-6)
    assert m["align_loss"] > 0 and m["align_gap"] > 0
