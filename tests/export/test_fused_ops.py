"""Fused contrib ops in the ONNX forward: GELU -> com.microsoft::Gelu.

Small hand-built graphs pin down what is rewritten and what is left alone; a real exported head's
forward, fused, must give the plain forward's outputs (z and every saved activation); and an
export with ``fused_ops`` is checked against the torch programs by the export itself and says so
in its manifest.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from flexsfl.export.fuse_onnx import CONTRIB_DOMAIN, contrib_ops, fuse_activations
from flexsfl.export.lower_onnx import fuse_program


def _model(nodes, consts: dict[str, float], outputs: list[str]) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.array(v, np.float32), k) for k, v in consts.items()]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5])],
                          [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs], inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])
    m.ir_version = 10
    return m


def _gelu_nodes(half_first: bool) -> list:
    last = [helper.make_node("Mul", ["half", "a"], ["m1"]), helper.make_node("Mul", ["x", "m1"], ["y"])]
    if not half_first:
        last = [helper.make_node("Mul", ["a", "x"], ["m1"]), helper.make_node("Mul", ["m1", "half"], ["y"])]
    return [helper.make_node("Div", ["x", "sqrt2"], ["d"]), helper.make_node("Erf", ["d"], ["e"]),
            helper.make_node("Add", ["e", "one"], ["a"]), *last]


GELU_CONSTS = {"sqrt2": math.sqrt(2.0), "one": 1.0, "half": 0.5}


def _run(m: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})


@pytest.mark.parametrize("half_first", [True, False])
def test_erf_gelu_becomes_one_fused_node_with_the_same_values(half_first):
    m = _model(_gelu_nodes(half_first), GELU_CONSTS, ["y"])
    x = np.linspace(-6, 6, 10, dtype=np.float32).reshape(2, 5)
    assert fuse_activations(m) == {"Gelu": 1}
    assert [(n.domain, n.op_type) for n in m.graph.node] == [(CONTRIB_DOMAIN, "Gelu")]
    assert not m.graph.initializer  # the pattern's constants went with it
    assert contrib_ops([m]) == ["com.microsoft::Gelu"]
    want = np.float32([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x.ravel()]).reshape(x.shape)
    np.testing.assert_allclose(_run(m, x)[0], want, rtol=1e-6, atol=1e-7)


def test_a_gelu_whose_intermediate_is_read_elsewhere_is_left_alone():
    # The erf is a graph output (as a value saved for the backward would be): fusing would lose it.
    m = _model(_gelu_nodes(True), GELU_CONSTS, ["y", "e"])
    before = onnx.helper.printable_graph(m.graph)
    assert fuse_activations(m) == {}
    assert onnx.helper.printable_graph(m.graph) == before


def test_a_lookalike_with_other_constants_is_left_alone():
    m = _model(_gelu_nodes(True), {**GELU_CONSTS, "half": 0.25}, ["y"])
    assert fuse_activations(m) == {}


def test_silu_stays_as_it_is():
    # Measured: QuickGelu(alpha=1) bought nothing over Sigmoid + Mul (export/fuse_onnx.py).
    m = _model([helper.make_node("Sigmoid", ["x"], ["s"]), helper.make_node("Mul", ["s", "x"], ["y"])], {}, ["y"])
    assert fuse_activations(m) == {}


def _feed(session, b: int = 3, t: int = 11) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feed = {}
    for i in session.get_inputs():
        shape = [d if isinstance(d, int) else (b if k == 0 else t) for k, d in enumerate(i.shape)]
        if i.name == "input_ids":
            feed[i.name] = rng.integers(0, 50, shape).astype(np.int64)
        elif i.name == "attention_mask":
            feed[i.name] = np.ones(shape, np.int64)
            feed[i.name][0, t - 4:] = 0  # padding
        else:
            feed[i.name] = (0.05 * rng.standard_normal(shape)).astype(np.float32)
    return feed


def test_a_fused_head_forward_gives_the_plain_outputs(tiny_bundles, tmp_path):
    plain = tiny_bundles("bert", 1, "ort") / "ort"
    fused = tmp_path / "ort"
    shutil.copytree(plain, fused)
    assert fuse_program(fused / "forward.onnx") == {"Gelu": 1}
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    a = ort.InferenceSession(str(plain / "forward.onnx"), opts, providers=["CPUExecutionProvider"])
    b = ort.InferenceSession(str(fused / "forward.onnx"), opts, providers=["CPUExecutionProvider"])
    assert [(o.name, o.shape) for o in a.get_outputs()] == [(o.name, o.shape) for o in b.get_outputs()]
    feed = _feed(a)
    for o, want, got in zip(a.get_outputs(), a.run(None, feed), b.run(None, feed)):
        err = np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-12)
        assert err <= 1e-5, f"{o.name}: rel err {err:.2e}"  # z and every saved activation


@pytest.mark.slow
def test_an_export_with_fused_ops_is_verified_and_recorded(tiny_model_dirs, tmp_path):
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    out = tmp_path / "bundle"
    # export_bundle checks the fused forward against the torch programs (rel err <= 1e-4) before writing it
    export_bundle(ExportConfig(model=str(tiny_model_dirs["bert"]), split=1, out=str(out), backend="ort", max_batch=4,
                               max_seq=32, ort_training_artifacts=False, fused_ops=True), progress=False)
    need = json.loads((out / "manifest.json").read_text())["runtime"]["ort"]
    assert need["fused_ops"] is True and need["contrib_ops"] == ["com.microsoft::Gelu"]
    backward = onnx.load(out / "ort" / "backward.onnx", load_external_data=False)
    assert contrib_ops([backward]) == []  # the backward stays standard ops
