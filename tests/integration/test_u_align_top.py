"""The alignment term at the top's input (``flexsfl serve --align-top``) over real websockets.

One ``flexsfl serve --align-lambda λ --align-top`` process and two ``flexsfl edge run`` processes
(tiny BERT, ONNX Runtime, torch blocked in the clients) at ``(s, u)`` = (1, 1) and (2, 0). Every
step sends Z' = head(x; φ) with Z and gets H' = middle_φ(Z') with H; the device sends
``G_H = dL/dH + λ‖dL/dH‖·a_H/‖a_H‖`` and applies the head's term at Z as before. After 10 SGD steps
per client, the server's global adapters and each personal upload equal an eager PyTorch
reference with both terms as tensor hooks on the full model (``u_reference.align_hook``,
rel err <= 1e-4); the terms' directions are taken at the Z, Z', H, H' that went over the wire,
which the reference first checks against its own (rel err <= 1e-4): near θ = φ the direction of
``KL(softmax(X') || softmax(X))``'s gradient is a difference of nearly equal float32 outputs, which
one ulp between ONNX Runtime and eager PyTorch moves by more than 1e-4 (see ``u_reference``). The clients talk to the server through a recording proxy: no frame the
server receives carries a label (as in ``test_u_labels``, now with Z' on the wire), every train
step's Activations carries Z' and its MiddleOutput H', and the test prints the extra bytes
per step. Each client's ``align_top_ratio`` is λ on every step whose H differs from
H' beyond float32 rounding (all but the round's first one to three, while θ is still φ or nearly).
"""

from __future__ import annotations

import dataclasses
import json
import struct

import numpy as np
import pytest

from flexsfl.core.wire import Activations, Limits, MiddleOutput, parse
from flexsfl.edge_runtime.data import read_examples
from flexsfl.edge_runtime.trainer import BatchCursor
from tests.no_torch import sitecustomize_dir

from .harness import ROOT, events, free_port
from .u_reference import BATCH, STEPS, Recorder, check_u, federate_u, reference_u, replay, wire_steps

LAYOUT = {"a": (1, 1), "b": (2, 0)}  # (s, u) of a 4-block model
LAM = 0.5


def test_u_align_top_equals_centralized_with_both_terms(tmp_path, u_models, u_bundles, u_data):
    bundles = {c: u_bundles("bert", s, u, "ort") for c, (s, u) in LAYOUT.items()}
    blocker = sitecustomize_dir(tmp_path / "notorch", tmp_path / "notorch.mark")
    server_port = free_port()
    proxy = Recorder(server_port)
    try:
        state = federate_u(u_models["bert"], u_data, tmp_path, [(c, b, "ort") for c, b in bundles.items()],
                           serve_args=("--align-lambda", str(LAM), "--align-top"), extra_env={"PYTHONPATH": f"{blocker}:{ROOT}"},
                           server_port=server_port, port=proxy.port, test_data=u_data["b"])
    finally:
        proxy.stop()
    assert len((tmp_path / "notorch.mark").read_text().split()) >= 2  # both clients ran with torch blocked
    log = replay(state)
    assert sorted(x for x in log if x[0] == "step") == sorted(("step", c, i) for c in LAYOUT for i in range(STEPS))
    refs = sorted((e["client"], e["step"]) for e in events(state, "u_reference"))
    assert refs == sorted((c, i) for c in LAYOUT for i in range(STEPS))  # every step sent Z' and got H'

    metrics = {e["client"]: e["metrics"] for e in events(state, "client_metrics")}
    for c in LAYOUT:
        m = metrics[c]
        assert m["align_top_steps"] == STEPS and m["aligned_steps"] == STEPS
        # exactly λ on every step whose outputs differ beyond float32 rounding, 0 on the others: the
        # first (θ = φ) and the next one or two, until LoRA B has moved Z (and H) by more than 1e-6
        for key in ("align_top_ratio", "align_ratio"):
            k = m[key] * STEPS / LAM
            assert k == pytest.approx(round(k), abs=1e-4) and STEPS - 3 <= round(k) <= STEPS - 1, (key, m)
        assert m["align_top_gap"] > 0 and m["align_top_loss"] > 0

    wire = wire_steps(proxy)
    assert sorted(wire) == sorted((c, i) for c in LAYOUT for i in range(STEPS)) and all(len(v) == 4 for v in wire.values())
    with_term = reference_u(u_models["bert"], u_data, LAYOUT, bundles["a"], log, align=LAM, wire=wire)
    worst = check_u(state, with_term)
    assert max(worst.values()) <= 1e-4
    # the terms changed the training: the same run without them ends elsewhere
    plain = reference_u(u_models["bert"], u_data, LAYOUT, bundles["a"], log)
    n = next(k for k in with_term[1]["a"] if "lora_B" in k)
    assert not np.allclose(plain[1]["a"][n], with_term[1]["a"][n], rtol=1e-3, atol=0)

    _no_labels_and_extra_bytes(proxy, u_data)


def _no_labels_and_extra_bytes(proxy: Recorder, u_data) -> None:
    """No frame the server received carries labels; every train step had Z' up and H' down; print
    the bytes Z' and H' added per step."""
    lim = Limits(max_frame_bytes=1 << 30)
    up = [(f, parse(f, lim)) for f in proxy.frames]
    down = [(f, parse(f, lim)) for f in proxy.replies]
    labels = []  # every batch the clients trained on, and the test split they evaluated
    for c in LAYOUT:
        cursor = BatchCursor(read_examples(u_data[c]), 0)
        labels += [np.array([e.label for e in cursor.next(BATCH)]) for _ in range(STEPS)]
    test = read_examples(u_data["b"])
    labels += [np.array([e.label for e in test[i:i + 8]]) for i in range(0, len(test), 8)]
    for data, msg in up:
        header = json.loads(data[12:12 + struct.unpack_from("<I", data, 8)[0]])
        names = list(header["fields"]) + [t["name"] for t in header["tensors"]]
        assert not any("label" in n.lower() for n in names), (type(msg).__name__, names)
        assert not isinstance(msg, Activations) or msg.labels is None
        for name, a in msg.arrays().items():
            for y in labels:
                assert not (a.size == y.size and np.array_equal(a.reshape(-1), y)), f"{type(msg).__name__}.{name} equals labels"
    acts = [(f, m) for f, m in up if isinstance(m, Activations) and m.mode == "train"]
    mids = [(f, m) for f, m in down if isinstance(m, MiddleOutput) and m.h_ref is not None]
    assert len(acts) == len(mids) == 2 * STEPS and all(m.z_ref is not None for _, m in acts)
    assert all(m.z_ref is None for _, m in up if isinstance(m, Activations) and m.mode == "eval")
    extra_up = sum(len(f) - len(dataclasses.replace(m, z_ref=None).serialize()) for f, m in acts)
    extra_down = sum(len(f) - len(dataclasses.replace(m, h_ref=None).serialize()) for f, m in mids)
    with_ref = sum(len(f) for f, m in acts) + sum(len(f) for f, m in up if type(m).__name__ == "TopGradients")
    with_ref += sum(len(f) for f, m in mids) + sum(len(f) for f, m in down if type(m).__name__ == "Gradients")
    u_step = with_ref - extra_up - extra_down  # the same train steps' four legs without Z' and H'
    z_bytes = sum(m.z.nbytes for _, m in acts)
    print(f"align-top bytes over {len(acts)} steps: Z' up +{extra_up} B, H' down +{extra_down} B "
          f"(Z alone {z_bytes} B); the U steps' four legs without them {u_step} B -> x{with_ref / u_step:.3f}")
    assert extra_up == pytest.approx(z_bytes, rel=0.02) and extra_down == pytest.approx(z_bytes, rel=0.02)
