"""Bundles: export through the CLI contract, verify, load; tampering is caught naming the file."""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest
import torch

from flexsfl.core.bundle import MANIFEST_NAME, SCHEMA_VERSION, load_bundle
from flexsfl.core.errors import BundleError
from flexsfl.cli import main


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_dirs):
    root = tmp_path_factory.mktemp("bundle")
    out = root / "llama-s2"
    rc = main(["export", "--model", str(tiny_model_dirs["llama"]), "--split", "2", "--backend", "all", "--target", "rpi5",
               "--num-labels", "3", "--out", str(out), "--tar", "--batch-size", "4", "--max-seq", "32", "--quiet"])
    assert rc == 0
    return out


def test_manifest_describes_every_program(exported):
    b = load_bundle(exported)
    m = b.manifest
    assert m.schema_version == SCHEMA_VERSION == 3 and m.runtime["ort"]["min_onnxruntime"] and m.split == 2 and m.backend == ("ort", "executorch") and m.target.name == "rpi5"
    assert m.model.family == "llama" and m.model.num_blocks == 4 and m.model.hidden_size == 64
    assert {"executorch.program", "ort.forward", "ort.backward", "ort.training_model", "ort.eval_model",
            "ort.optimizer_model", "ort.checkpoint"} <= set(m.artifacts)
    for role in ("ort.forward", "ort.backward", "executorch.forward", "executorch.backward", "ort.training"):
        assert m.inputs[role] and m.outputs[role]
    fwd = m.inputs["ort.forward"]
    assert [t.name for t in fwd[:2]] == ["input_ids", "attention_mask"] and fwd[0].shape == ("batch", "seq")
    assert [t.name for t in fwd[2:]] == [p.name for p in m.trainable_parameters]
    assert all(p.block < 2 and "lora_" in p.name for p in m.trainable_parameters)
    assert m.step == {"ort": "split", "executorch": "split"}
    assert set(m.files) == {p.relative_to(exported).as_posix() for p in exported.rglob("*") if p.is_file()} - {MANIFEST_NAME}
    assert any("aarch64" in n for n in m.extra["target_notes"])  # rpi5 + ort: says what the device needs
    # --max-batch defaults to the training batch, and the manifest says what ExecuTorch planned for
    assert m.max_batch == 4 and m.runtime["executorch"] == {"planned_batch": 4, "planned_seq": 32, "train_batch": 4}


def test_max_batch_defaults_to_the_training_batch():
    from flexsfl.core.errors import ConfigError
    from flexsfl.export.config import ExportConfig

    assert ExportConfig(model="m", split=1, out="o").max_batch == ExportConfig.batch_size == 8
    assert ExportConfig(model="m", split=1, out="o", batch_size=16).max_batch == 16
    assert ExportConfig(model="m", split=1, out="o", batch_size=8, max_batch=32).max_batch == 32
    with pytest.raises(ConfigError, match="batch_size must be an int >= 1"):
        ExportConfig(model="m", split=1, out="o", batch_size=0)


def test_adapter_loads_with_peft(exported, tiny_model_dirs):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_config(
        __import__("transformers").AutoConfig.from_pretrained(tiny_model_dirs["llama"], num_labels=3))
    model = PeftModel.from_pretrained(base, str(exported / "adapter"))
    want = load_file(str(exported / "adapter" / "adapter_model.safetensors"))
    got = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    # The file holds every trainable tensor of the head, exactly as the manifest lists them...
    m = load_bundle(exported).manifest
    assert want and {n: tuple(t.shape) for n, t in want.items()} == {p.name: tuple(p.shape) for p in m.trainable_parameters}
    # ...which is every LoRA tensor PEFT builds from the adapter's config: A and B of each target
    # module (q, v) in each of the head's blocks (0, 1) and nothing of the tail's.
    assert set(got) == set(want)
    layers = {int(re.search(r"\.layers\.(\d+)\.", n).group(1)) for n in want}
    assert layers == {0, 1} and len(want) == 2 * 2 * 2
    for name, t in want.items():
        torch.testing.assert_close(got[name], t)
    assert all(t.abs().sum() > 0 for n, t in want.items() if "lora_A" in n)  # real values, not an empty shell


def test_every_flipped_byte_is_caught_naming_the_file(exported, tmp_path):
    m = load_bundle(exported).manifest
    for rel in m.files:
        copy = tmp_path / rel.replace("/", "_")
        shutil.copytree(exported, copy)
        f = copy / rel
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0x01
        f.write_bytes(bytes(data))
        with pytest.raises(BundleError, match=rf"{pathlib.Path(rel).name}: sha256 mismatch") as e:
            load_bundle(copy)
        assert "\n" not in str(e.value)
        shutil.rmtree(copy)


def test_truncated_missing_and_edited_manifest(exported, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(exported, copy)
    onnx = copy / "ort" / "forward.onnx"
    onnx.write_bytes(onnx.read_bytes()[:100])
    with pytest.raises(BundleError, match="forward.onnx: sha256 mismatch"):
        load_bundle(copy)
    onnx.unlink()
    with pytest.raises(BundleError, match="forward.onnx: listed in the manifest but missing"):
        load_bundle(copy)
    shutil.rmtree(copy)
    shutil.copytree(exported, copy)
    man = json.loads((copy / MANIFEST_NAME).read_text())
    for edit, msg in (
        (lambda d: d.update(schema_version=99), "schema_version 99 is not supported"),
        (lambda d: d["files"].update({"../../etc/passwd": "0" * 64}), "escapes the bundle"),
        (lambda d: d.update(split=3), "layout_hash does not match"),
        (lambda d: d.pop("tokenizer"), "missing field manifest.tokenizer"),
    ):
        d = json.loads(json.dumps(man))
        edit(d)
        (copy / MANIFEST_NAME).write_text(json.dumps(d))
        with pytest.raises(BundleError, match=msg):
            load_bundle(copy)
    (copy / MANIFEST_NAME).write_text("{not json")
    with pytest.raises(BundleError, match="manifest.json: not valid JSON"):
        load_bundle(copy)


def test_tarball_round_trip_and_cli_verify(exported, tmp_path, capsys):
    tar = exported.with_name(exported.name + ".tar.gz")
    b = load_bundle(tar, cache=tmp_path / "cache")
    assert b.manifest.layout_hash == load_bundle(exported).manifest.layout_hash
    assert main(["bundle", "verify", str(tar)]) == 0
    assert "every checksum matches" in capsys.readouterr().out
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(tar.read_bytes()[:2000])
    assert main(["bundle", "verify", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.tar.gz" in err and len(err.strip().splitlines()) == 1


def test_symlink_in_a_directory_bundle_is_refused(exported, tmp_path):
    """A listed file that is a link (here to a file outside with the same bytes) is refused, naming it."""
    copy = tmp_path / "copy"
    shutil.copytree(exported, copy)
    rel = json.loads((copy / MANIFEST_NAME).read_text())["tokenizer"]
    outside = tmp_path / "outside"
    shutil.copy(copy / rel, outside)
    (copy / rel).unlink()
    (copy / rel).symlink_to(outside)
    with pytest.raises(BundleError, match="symbolic link") as e:
        load_bundle(copy)
    assert rel in str(e.value) and len(str(e.value).splitlines()) == 1


def test_planted_extraction_is_replaced_by_the_tarball(exported, tmp_path):
    tar = exported.with_name(exported.name + ".tar.gz")
    cache = tmp_path / "cache"
    b = load_bundle(tar, cache=cache)
    man = b.root / MANIFEST_NAME
    man.write_text(man.read_text().replace('"split": 2', '"split": 1'))  # someone edits the cached copy
    again = load_bundle(tar, cache=cache)
    assert again.root == b.root and again.manifest.split == 2 and again.manifest_sha256 == load_bundle(exported).manifest_sha256


def test_programs_in_the_bundle_train(exported):
    """The bundle's own artifacts, through the backends, give the head's exact gradients."""
    from flexsfl.edge_runtime.backends import open_backend

    b = load_bundle(exported)
    ids = np.random.default_rng(0).integers(5, 3000, (3, 9))
    mask = np.ones((3, 9), np.int64)
    mask[2, 4:] = 0
    g = np.random.default_rng(1).standard_normal((3, 9, 64)).astype(np.float32)
    from flexsfl.sim.eager_backend import TorchBackend

    ref = TorchBackend(b)
    want_z, want = ref.forward(ids, mask), None
    want = ref.backward(g)
    for name in ("ort", "executorch"):
        be = open_backend(name, b, threads=1)
        z = be.forward(ids, mask)
        np.testing.assert_allclose(z, want_z, rtol=1e-4, atol=1e-5)
        got = be.backward(g)
        for n in want:
            err = np.linalg.norm(got[n] - want[n]) / max(np.linalg.norm(want[n]), 1e-12)
            assert err <= 1e-4, (name, n, err)


def test_existing_out_dir_is_refused(exported, tiny_model_dirs, capsys):
    rc = main(["export", "--model", str(tiny_model_dirs["llama"]), "--split", "2", "--num-labels", "3",
               "--out", str(exported), "--quiet"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    load_bundle(exported)  # untouched


def test_export_can_leave_out_ort_training_artifacts(tmp_path, tiny_model_dirs):
    out = tmp_path / "gpt2-s1"
    rc = main(["export", "--model", str(tiny_model_dirs["gpt2"]), "--split", "1", "--backend", "ort", "--num-labels", "2",
               "--out", str(out), "--max-batch", "2", "--max-seq", "8", "--no-ort-training-artifacts", "--quiet"])
    assert rc == 0
    m = load_bundle(out).manifest
    assert {"ort.forward", "ort.backward"} <= set(m.artifacts)
    assert not {role for role in m.artifacts if role.startswith(("ort.training", "ort.eval", "ort.optimizer", "ort.checkpoint"))}
    assert not (out / "ort" / "training").exists()


def test_onnx_programs_store_each_frozen_weight_once(exported):
    # The backward needs the blocks' weights (transposed) too; it must point into the forward's
    # copies in the shared weights.bin instead of carrying its own.
    import onnx

    ort_dir = exported / "ort"
    offsets = {}
    for name in ("forward", "backward"):
        model = onnx.load(ort_dir / f"{name}.onnx", load_external_data=False)
        ext = [{e.key: e.value for e in t.external_data} for t in model.graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL]
        assert ext and {e["location"] for e in ext} == {"weights.bin"}
        offsets[name] = {int(e["offset"]) for e in ext}
    assert offsets["backward"] <= offsets["forward"]
    assert load_bundle(exported).manifest.artifacts["ort.weights"] == "ort/weights.bin"
