"""Labels never leave the device in the U-shaped topology.

A recording websocket proxy between two real ``flexsfl edge run`` processes (tiny BERT, ONNX
Runtime, a top of 1 and 0 blocks) and a real ``flexsfl serve`` keeps every frame the server
receives during a round and the personal evaluation after it. No frame carries a label: no
Activations with a labels tensor, no tensor or header field named like one, and no tensor whose
values equal a batch's labels (the test rebuilds every batch the clients drew). The evaluation
ran on the device (personal accuracy reported in Metrics), so predictions did not leave it either.
"""

from __future__ import annotations

import json
import struct

import numpy as np

from flexsfl.core.wire import Activations, Hello, Limits, Metrics, TopGradients, parse
from flexsfl.edge_runtime.data import read_examples
from flexsfl.edge_runtime.trainer import BatchCursor

from .harness import events, free_port
from .u_reference import BATCH, STEPS, Recorder, federate_u

LAYOUT = {"a": (1, 1), "b": (2, 0)}


def test_no_frame_the_server_receives_carries_labels(tmp_path, u_models, u_bundles, u_data):
    server_port = free_port()
    proxy = Recorder(server_port)
    try:
        state = federate_u(u_models["bert"], u_data, tmp_path,
                           [(c, u_bundles("bert", s, u, "ort"), "ort") for c, (s, u) in LAYOUT.items()],
                           server_port=server_port, port=proxy.port, test_data=u_data["b"])
    finally:
        proxy.stop()
    frames = proxy.frames
    msgs = [parse(f, Limits(max_frame_bytes=1 << 30)) for f in frames]
    kinds = [type(m).__name__ for m in msgs]
    assert kinds.count("Hello") == 2 and all(m.top >= 0 for m in msgs if isinstance(m, Hello))
    assert kinds.count("TopGradients") == 2 * STEPS
    evals = [m for m in msgs if isinstance(m, Activations) and m.mode == "eval"]
    assert len([m for m in msgs if isinstance(m, Activations)]) == 2 * STEPS + len(evals) and evals

    labels = []  # every batch the clients trained on, and the test split they evaluated
    for c in LAYOUT:
        cursor = BatchCursor(read_examples(u_data[c]), 0)
        labels += [np.array([e.label for e in cursor.next(BATCH)]) for _ in range(STEPS)]
    test = read_examples(u_data["b"])
    labels += [np.array([e.label for e in test[i:i + 8]]) for i in range(0, len(test), 8)]
    for data, msg in zip(frames, msgs):
        header = json.loads(data[12:12 + struct.unpack_from("<I", data, 8)[0]])
        names = list(header["fields"]) + [t["name"] for t in header["tensors"]]
        assert not any("label" in n.lower() for n in names), (type(msg).__name__, names)
        if isinstance(msg, Activations):
            assert msg.labels is None
        for name, a in msg.arrays().items():
            for y in labels:
                assert not (a.size == y.size and np.array_equal(a.reshape(-1), y)), f"{type(msg).__name__}.{name} equals labels"
        if isinstance(msg, Metrics):
            assert not any("pred" in k or "label" in k for k in msg.metrics)
    assert all(isinstance(m.loss, float) for m in msgs if isinstance(m, TopGradients))
    accs = [e["metrics"]["personal_acc"] for e in events(state, "client_metrics") if "personal_acc" in e["metrics"]]
    assert len(accs) == 2 and all(0 <= a <= 1 for a in accs)
