"""The bundle contract: a third-party client drives every program with the manifest alone.

Each program of a real tiny bundle is run straight on its runtime (an ONNX Runtime
``InferenceSession``, the ExecuTorch program) with a feed built only from the manifest's
declared input names, dtypes and shapes, plus the adapter file read by the manifest's
``trainable_parameters`` names; outputs are fetched by the manifest's output names (ONNX) or
position (ExecuTorch) and must have the declared shapes. No flexsfl backend code is used.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file

from flexsfl.core.bundle import ADAPTER_WEIGHTS_NAME, MANIFEST_NAME, Bundle, TensorSpec, load_bundle
from flexsfl.core.errors import BundleError

B, T = 3, 7
_NP = {"float32": np.float32, "int64": np.int64, "int32": np.int32, "bool": np.bool_, "uint8": np.uint8}


@pytest.fixture(scope="module")
def bundle(tiny_bundles) -> Bundle:
    return load_bundle(tiny_bundles("gpt2", 1, "all"))


def _shape(t: TensorSpec) -> tuple[int, ...]:
    return tuple({"batch": B, "seq": T}.get(s, s) if isinstance(s, str) else s for s in t.shape)


def _forward_feed(bundle: Bundle, role: str) -> dict[str, np.ndarray]:
    """input_ids / attention_mask from their specs; every other input by name from the adapter file."""
    m = bundle.manifest
    theta = load_file(str(bundle.adapter_dir / ADAPTER_WEIGHTS_NAME))
    rng = np.random.default_rng(0)
    feed = {}
    for t in m.inputs[role]:
        if t.name == "input_ids":
            feed[t.name] = rng.integers(0, m.model.vocab_size, _shape(t)).astype(_NP[t.dtype])
        elif t.name == "attention_mask":
            feed[t.name] = np.ones(_shape(t), _NP[t.dtype])
        else:
            feed[t.name] = theta[t.name]  # KeyError here: the manifest names an input the adapter file lacks
            assert feed[t.name].shape == _shape(t) and feed[t.name].dtype == _NP[t.dtype]
    return feed


def _check_outputs(specs, arrays) -> None:
    assert len(arrays) == len(specs)
    for t, a in zip(specs, arrays):
        assert tuple(a.shape) == _shape(t), t.name
        assert np.asarray(a).dtype == _NP[t.dtype], t.name
        assert np.isfinite(np.asarray(a, dtype=np.float64)).all(), t.name


def _backward_feed(bundle: Bundle, role: str, fwd_role: str, fwd_out: dict[str, np.ndarray], theta: dict) -> dict:
    """Saved activations by the forward's output names, grad_z random, θ by name."""
    rng = np.random.default_rng(1)
    feed = {}
    for t in bundle.manifest.inputs[role]:
        if t.name == "grad_z":
            feed[t.name] = rng.standard_normal(_shape(t)).astype(np.float32)
        elif t.name in fwd_out:
            feed[t.name] = fwd_out[t.name]
        else:
            feed[t.name] = theta[t.name]
    return feed


def test_trainable_inputs_carry_the_peft_names_in_every_program(bundle):
    m = bundle.manifest
    names = [p.name for p in m.trainable_parameters]
    assert names and all(n.startswith("base_model.model.") and ".default." not in n for n in names)
    for backend in m.backend:
        fwd, bwd = m.program(f"{backend}.forward"), m.program(f"{backend}.backward")
        assert [t.name for t in fwd.inputs] == ["input_ids", "attention_mask", *names]
        assert [t.name for t in bwd.inputs[-len(names):]] == names
        assert [t.name for t in bwd.outputs] == [f"grad.{n}" for n in names]
        # the backward takes the forward's saved activations under the same names
        assert [t.name for t in bwd.inputs[: len(fwd.outputs) - 1]] == [t.name for t in fwd.outputs[1:]]


def test_onnx_programs_run_from_the_manifests_names_alone(bundle):
    import onnxruntime as ort

    m = bundle.manifest
    theta = load_file(str(bundle.adapter_dir / ADAPTER_WEIGHTS_NAME))
    sessions = {r: ort.InferenceSession(str(bundle.path(r)), providers=["CPUExecutionProvider"]) for r in ("ort.forward", "ort.backward")}
    for role, s in sessions.items():  # exactly the declared names, in the declared order
        assert [i.name for i in s.get_inputs()] == [t.name for t in m.inputs[role]]
        assert [o.name for o in s.get_outputs()] == [t.name for t in m.outputs[role]]
    fwd_names = [t.name for t in m.outputs["ort.forward"]]
    fwd = sessions["ort.forward"].run(fwd_names, _forward_feed(bundle, "ort.forward"))
    _check_outputs(m.outputs["ort.forward"], fwd)
    feed = _backward_feed(bundle, "ort.backward", "ort.forward", dict(zip(fwd_names, fwd)), theta)
    grads = sessions["ort.backward"].run([t.name for t in m.outputs["ort.backward"]], feed)
    _check_outputs(m.outputs["ort.backward"], grads)
    assert any(np.abs(g).sum() > 0 for g in grads)


def test_executorch_methods_run_from_the_manifests_order_alone(bundle):
    torch = pytest.importorskip("torch")
    runtime = pytest.importorskip("executorch.runtime")

    m = bundle.manifest
    theta = load_file(str(bundle.adapter_dir / ADAPTER_WEIGHTS_NAME))
    program = runtime.Runtime.get().load_program(bundle.path("executorch.program"))
    methods = {r: program.load_method(r.split(".")[1]) for r in ("executorch.forward", "executorch.backward")}
    for role, meth in methods.items():
        assert meth.metadata.num_inputs() == len(m.inputs[role]) and meth.metadata.num_outputs() == len(m.outputs[role])
    feed = _forward_feed(bundle, "executorch.forward")
    fwd = [o.numpy() for o in methods["executorch.forward"].execute([torch.from_numpy(feed[t.name]) for t in m.inputs["executorch.forward"]])]
    _check_outputs(m.outputs["executorch.forward"], fwd)
    fwd_out = dict(zip([t.name for t in m.outputs["executorch.forward"]], fwd))
    feed = _backward_feed(bundle, "executorch.backward", "executorch.forward", fwd_out, theta)
    args = [torch.from_numpy(np.ascontiguousarray(feed[t.name])) for t in m.inputs["executorch.backward"]]
    grads = [o.numpy() for o in methods["executorch.backward"].execute(args)]
    _check_outputs(m.outputs["executorch.backward"], grads)
    # the same batch through ONNX gives the same Z: both describe one program
    import onnxruntime as ort

    z_ort = ort.InferenceSession(str(bundle.path("ort.forward")), providers=["CPUExecutionProvider"]).run(
        ["z"], _forward_feed(bundle, "ort.forward"))[0]
    np.testing.assert_allclose(fwd[0], z_ort, rtol=1e-4, atol=1e-5)


def _edited(bundle: Bundle, tmp_path, edit) -> Bundle:
    root = tmp_path / "b"
    shutil.copytree(bundle.root, root)
    d = json.loads((root / MANIFEST_NAME).read_text())
    edit(d)
    (root / MANIFEST_NAME).write_text(json.dumps(d))
    return root


def test_a_manifest_whose_program_names_disagree_is_refused(bundle, tmp_path):
    def rename_first_param(d):
        d["inputs"]["ort.forward"][2]["name"] = "blocks.0.attention.lora_A.default.weight"

    with pytest.raises(BundleError, match="program 'ort.forward' does not name its trainable inputs"):
        load_bundle(_edited(bundle, tmp_path, rename_first_param))


def test_the_ort_backend_refuses_graph_names_the_manifest_does_not_declare(bundle, tmp_path):
    """A schema-3 manifest whose names are consistent but not the graph's (e.g. the graph was swapped)."""
    from flexsfl.edge_runtime.backends.ort import OrtBackend

    def rename_output(d):
        d["outputs"]["ort.forward"][1]["name"] = "kept_0"
        d["inputs"]["ort.backward"][0]["name"] = "kept_0"

    edited = load_bundle(_edited(bundle, tmp_path, rename_output))
    with pytest.raises(BundleError, match=r"forward.onnx: outputs differ from the manifest's ort.forward at position 1 "
                                          r"\(graph 'saved_0', manifest 'kept_0'\); re-export the bundle"):
        OrtBackend(edited, threads=1)
