"""Version skew: the manifest says which onnxruntime its programs need, and the device refuses older ones.

A real tiny bundle is exported; the "older runtime" is the backend's ``runtime_version``
parameter (standing in for ``onnxruntime.__version__``), so the real ONNX Runtime loads the
programs whenever the check lets it. The arm64 side (the x86-exported programs in aarch64
onnxruntime 1.32) is tests/device/.
"""

from __future__ import annotations

import json
import shutil

import onnx
import pytest

from flexsfl.core.bundle import MANIFEST_NAME, SCHEMA_VERSION, load_bundle
from flexsfl.core.errors import BackendError, BundleError
from flexsfl.edge_runtime.backends.ort import OrtBackend
from flexsfl.export.lower_onnx import min_onnxruntime


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("gpt2", 1, "ort"))


def test_manifest_records_opset_ir_version_and_minimum_runtime(bundle):
    need = bundle.manifest.runtime["ort"]
    for role in ("ort.forward", "ort.backward"):
        model = onnx.load(bundle.path(role), load_external_data=False)
        assert model.ir_version <= need["onnx_ir_version"]
        assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) <= need["onnx_opset"]
    assert need == {"onnx_opset": 18, "onnx_ir_version": 10, "min_onnxruntime": "1.18", "contrib_ops": [], "fused_ops": False}
    assert bundle.manifest.schema_version == SCHEMA_VERSION == 3


@pytest.mark.parametrize("opset, ir, want", [(17, 8, "1.14"), (18, 8, "1.14"), (18, 9, "1.15"), (20, 9, "1.17"),
                                             (18, 10, "1.18"), (21, 10, "1.18"), (22, 10, "1.20")])
def test_minimum_runtime_follows_onnx_runtimes_version_matrix(opset, ir, want):
    assert min_onnxruntime(opset, ir) == want


@pytest.mark.parametrize("older", ["1.17.3", "1.16.0", "1.14.1"])
def test_older_runtime_is_refused_with_one_line_saying_what_to_install(bundle, older):
    with pytest.raises(BackendError) as err:
        OrtBackend(bundle, threads=1, runtime_version=older)
    message = str(err.value)
    assert "\n" not in message
    assert f"onnxruntime {older} is too old" in message and "opset 18, IR version 10" in message
    assert "pip install 'onnxruntime>=1.18'" in message


@pytest.mark.parametrize("version", ["1.18.0", "1.19.2", "1.32.0", "1.20.0rc1", "2.0.0"])
def test_the_minimum_and_newer_runtimes_load_the_programs(bundle, version):
    backend = OrtBackend(bundle, threads=1, runtime_version=version)
    assert set(backend.get_params()) == {p.name for p in bundle.manifest.trainable_parameters}


def _edited(bundle, tmp_path, edit):
    root = tmp_path / "b"
    shutil.copytree(bundle.root, root)
    data = json.loads((root / MANIFEST_NAME).read_text())
    edit(data)
    (root / MANIFEST_NAME).write_text(json.dumps(data))
    return root


def test_schema_1_bundles_still_load_and_skip_the_check(bundle, tmp_path):
    def to_v1(d):
        d["schema_version"] = 1
        del d["runtime"]

    old = load_bundle(_edited(bundle, tmp_path, to_v1))
    assert old.manifest.runtime == {}
    OrtBackend(old, threads=1, runtime_version="1.17.0")  # nothing to check against: ORT's loader decides


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: d.pop("runtime"), "missing field manifest.runtime"),
    (lambda d: d["runtime"]["ort"].pop("min_onnxruntime"), "missing field runtime.ort.min_onnxruntime"),
    (lambda d: d["runtime"]["ort"].update(onnx_opset="18"), "runtime.ort.onnx_opset has the wrong type"),
    (lambda d: d["runtime"]["ort"].update(min_onnxruntime="latest"), "'latest' is not a version"),
])
def test_schema_2_runtime_table_is_strict(bundle, tmp_path, edit, fragment):
    with pytest.raises(BundleError, match=fragment.replace(".", r"\.")):
        load_bundle(_edited(bundle, tmp_path, edit))
