"""ONNX Runtime and ExecuTorch backends on real bundles, against eager autograd and torch.optim.

Bundles are made by the real export pipeline (``flexsfl.export.pipeline.export_bundle``): the tiny random
GPT-2 / Llama ones come from the session-wide ``tiny_bundles`` fixture (tests/conftest.py); the
slow matrix adds real MiniLM weights, Llama and more split points. The reference is the same head rebuilt in eager PyTorch from the same model and
seed, with the same adapters.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import textwrap

import numpy as np
import pytest
import torch

from flexsfl.edge_runtime.backends import open_backend
from flexsfl.core.bundle import MANIFEST_NAME, Bundle, load_bundle, sha256_file
from flexsfl.core.errors import BackendError, BundleError, ConfigError
from flexsfl.edge_runtime.optim import SGD
from tests.no_torch import run_without_torch

BACKENDS = ["ort", "executorch"]
FAST = [("gpt2", 1)]
SLOW = [("minilm", 1), ("minilm", 3), ("gpt2", 2), ("llama", 1), ("llama", 3)]
MATRIX = FAST + [pytest.param(c, marks=pytest.mark.slow) for c in SLOW]

_minilm: dict = {}


@pytest.fixture
def bundle(request, tiny_bundles, tmp_path_factory) -> Bundle:
    """A real two-backend bundle for (family, split), exported once per session."""
    family, split = request.param
    if family != "minilm":
        return load_bundle(tiny_bundles(family, split, "all"))
    if split not in _minilm:
        from flexsfl.export.pipeline import ExportConfig, export_bundle

        out = tmp_path_factory.mktemp("bundles") / f"minilm-s{split}"
        cfg = ExportConfig(model="minilm", split=split, out=str(out), backend="all", max_batch=4, max_seq=32,
                           ort_training_artifacts=False)
        _minilm[split] = export_bundle(cfg, progress=False)[0]
    return _minilm[split]


_references: dict = {}


def reference(bundle: Bundle):
    """(head, {canonical name: head parameter}) in eager PyTorch, as the bundle was exported."""
    key = str(bundle.root)
    if key not in _references:
        from flexsfl.model.loading import LoraSettings, load_model
        from flexsfl.model.partition import build_head

        m = bundle.manifest
        lora = LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules)
        loaded = load_model(m.model.id, task=m.model.task, num_labels=m.model.num_labels, lora=lora,
                            seed=int(m.extra.get("seed", 0)))
        head = build_head(loaded, m.split)
        own = dict(head.named_parameters())
        params = {canon: own[n] for n, canon in head.canonical().items()}
        assert list(params) == [p.name for p in m.trainable_parameters]
        for p in head.parameters():
            p.requires_grad_(False)
        _references[key] = head, params
    return _references[key]


def reference_with(bundle, theta, *, requires_grad):
    """The eager reference head with its adapters set to θ: (head, params, leaves in θ's order)."""
    head, params = reference(bundle)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(theta[n]))
    leaves = list(params.values())
    for p in leaves:
        p.requires_grad_(requires_grad)
    return head, params, leaves


def eager(bundle, theta, ids, mask, grad_z=None):
    """z (and the θ-gradients of Σ z·grad_z) of the eager head with adapters θ."""
    head, params, leaves = reference_with(bundle, theta, requires_grad=grad_z is not None)
    z = head(torch.from_numpy(ids), torch.from_numpy(mask))
    if grad_z is None:
        return z.detach().numpy()
    grads = torch.autograd.grad(z, leaves, grad_outputs=torch.from_numpy(grad_z))
    return z.detach().numpy(), {n: g.numpy() for n, g in zip(params, grads)}


def random_theta(bundle, seed):
    rng = np.random.default_rng(seed)
    return {p.name: (0.05 * rng.standard_normal(p.shape)).astype(np.float32) for p in bundle.manifest.trainable_parameters}


def batch(bundle, b, t, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, bundle.manifest.model.vocab_size, (b, t), dtype=np.int64)
    mask = np.ones((b, t), np.int64)
    mask[-1, max(1, t // 2):] = 0  # padding in the last row
    return ids, mask


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - b) / max(np.linalg.norm(b), 1e-30))


def bundle_id(case):
    return f"{case[0]}-s{case[1]}"


@pytest.mark.parametrize("bundle", MATRIX, indirect=True, ids=bundle_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_gradients_match_autograd_at_three_shapes(bundle, name):
    be = open_backend(name, bundle, threads=1)
    theta = random_theta(bundle, seed=1)
    be.set_params(theta)
    m = bundle.manifest
    for i, (b, t) in enumerate([(1, 2), (3, 17), (min(m.max_batch, 4), min(m.max_seq, 32))]):
        ids, mask = batch(bundle, b, t, seed=i)
        z = be.forward(ids, mask)
        grad_z = np.random.default_rng(10 + i).standard_normal(z.shape).astype(np.float32)
        z_ref, g_ref = eager(bundle, theta, ids, mask, grad_z)
        assert z.dtype == np.float32 and rel(z, z_ref) <= 1e-5
        grads = be.backward(grad_z)
        assert list(grads) == list(theta)
        for n, g in grads.items():
            assert g.shape == theta[n].shape and g.dtype == np.float32
            zero = not np.any(g_ref[n])  # one visible token: attention's query gets no gradient
            assert (zero and not np.any(np.abs(g) > 1e-12)) or rel(g, g_ref[n]) <= 1e-4, (n, b, t, rel(g, g_ref[n]))


@pytest.mark.parametrize("bundle", MATRIX, indirect=True, ids=bundle_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_five_sgd_steps_match_torch_optim(bundle, name):
    be = open_backend(name, bundle, threads=1)
    theta0 = random_theta(bundle, seed=2)
    be.set_params(theta0)
    head, params, leaves = reference_with(bundle, theta0, requires_grad=True)
    opt = topt = None
    for step in range(5):
        ids, mask = batch(bundle, 3, 12 + step, seed=100 + step)
        shape = (3, 12 + step, bundle.manifest.model.hidden_size)
        grad_z = np.random.default_rng(200 + step).standard_normal(shape).astype(np.float32)
        be.forward(ids, mask)
        grads = be.backward(grad_z)
        if opt is None:
            # A first step that moves θ by ~5 %: big enough to see, small enough that rounding
            # differences (torch's FMAs vs numpy) do not grow into drift, for every model.
            norm = lambda d: np.sqrt(sum(float(np.sum(np.square(a))) for a in d.values()))  # noqa: E731
            lr = 0.05 * norm(theta0) / norm(grads)
            opt, topt = SGD(lr=lr, momentum=0.9), torch.optim.SGD(leaves, lr=lr, momentum=0.9)
        opt.step(be.params, grads)
        topt.zero_grad()
        (head(torch.from_numpy(ids), torch.from_numpy(mask)) * torch.from_numpy(grad_z)).sum().backward()
        topt.step()
    ours = be.get_params()
    for n, p in params.items():
        assert rel(ours[n], theta0[n]) > 1e-3, n  # every tensor trained
        assert rel(ours[n], p.detach().numpy()) <= 1e-4, (n, rel(ours[n], p.detach().numpy()))


@pytest.mark.parametrize("bundle", FAST, indirect=True, ids=bundle_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_reference_forward_leaves_the_kept_one_alone(bundle, name):
    """forward(params=φ, keep=False) between forward and backward (the alignment term)."""
    be = open_backend(name, bundle, threads=1)
    theta, phi = random_theta(bundle, 3), random_theta(bundle, 4)
    be.set_params(theta)
    ids, mask = batch(bundle, 2, 10, seed=5)
    z = be.forward(ids, mask)
    z_phi = be.forward(ids, mask, params=phi, keep=False)
    assert rel(z_phi, eager(bundle, phi, ids, mask)) <= 1e-5
    grad_z = np.ones_like(z)
    _, g_ref = eager(bundle, theta, ids, mask, grad_z)
    grads = be.backward(grad_z)
    assert all(rel(grads[n], g_ref[n]) <= 1e-4 for n in theta)
    assert all(np.array_equal(be.params[n], theta[n]) for n in theta)  # φ never became θ


@pytest.mark.parametrize("bundle", FAST, indirect=True, ids=bundle_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_bad_inputs_get_one_line_errors_and_change_nothing(bundle, name):
    be = open_backend(name, bundle, threads=1)
    m = bundle.manifest
    with pytest.raises(BackendError, match="without a kept forward"):
        be.backward(np.zeros((1, 2, m.model.hidden_size), np.float32))
    ids, mask = batch(bundle, 2, 6, seed=0)
    bad_batches = [
        ((ids[0], mask[0]), "must both be \\[B, T\\]"),
        ((ids, mask[:, :5]), "must both be \\[B, T\\]"),
        ((np.zeros((m.max_batch + 1, 4), np.int64),) * 2, "outside this bundle's limits"),
        ((np.zeros((2, m.max_seq + 1), np.int64),) * 2, "outside this bundle's limits"),
        ((np.zeros((2, 1), np.int64),) * 2, "outside this bundle's limits"),
        ((ids.astype(np.float32), mask), "must be integers"),
        ((ids + m.model.vocab_size, mask), "token ids must be in"),
        ((ids, mask * 2), "only 0 \\(padding\\) and 1"),
    ]
    for (i, k), match in bad_batches:
        with pytest.raises(ConfigError, match=match):
            be.forward(i, k)
    z = be.forward(ids, mask)
    for g, match in [
        (np.zeros((2, 5, m.model.hidden_size), np.float32), "grad_z must be float"),
        (np.zeros(z.shape, np.int64), "grad_z must be float"),
        (np.full(z.shape, np.nan, np.float32), "NaN or Inf"),
    ]:
        with pytest.raises(ConfigError, match=match):
            be.backward(g)
    assert be.backward(np.ones_like(z)).keys() == be.params.keys()  # the kept forward survived
    with pytest.raises(BackendError, match="without a kept forward"):
        be.backward(np.ones_like(z))  # and was consumed

    theta = be.get_params()
    first = next(iter(theta))
    for params, match in [
        ({**theta, "extra": theta[first]}, "do not match the bundle"),
        ({k: v for k, v in theta.items() if k != first}, "do not match the bundle"),
        ({**theta, first: theta[first].T}, "has shape"),
        ({**theta, first: np.full_like(theta[first], np.inf)}, "finite floats"),
    ]:
        with pytest.raises(ConfigError, match=match):
            be.set_params(params)
    assert all(np.array_equal(be.params[n], theta[n]) for n in theta)


@pytest.mark.parametrize("bundle", FAST, indirect=True, ids=bundle_id)
def test_open_backend_refuses_what_it_cannot_run(bundle):
    with pytest.raises(ConfigError, match="unknown backend 'tflite'"):
        open_backend("tflite", bundle)
    with pytest.raises(ConfigError, match="threads must be >= 1"):
        open_backend("ort", bundle, threads=0)


def _rewrite(bundle: Bundle, dest, change) -> Bundle:
    """A copy of ``bundle`` with ``change(root)`` applied and the checksums redone (a bad export)."""
    shutil.copytree(bundle.root, dest)
    change(dest)
    m = bundle.manifest
    files = {rel: sha256_file(dest / rel) for rel in m.files}
    (dest / MANIFEST_NAME).write_text(dataclasses.replace(m, files=files).dumps())
    return load_bundle(dest)


@pytest.mark.parametrize("bundle", FAST, indirect=True, ids=bundle_id)
def test_programs_that_do_not_fit_the_manifest_are_refused(bundle, tmp_path):
    m = bundle.manifest

    def swap(root):
        f, b = root / m.artifacts["ort.forward"], root / m.artifacts["ort.backward"]
        data = f.read_bytes()
        f.write_bytes(b.read_bytes())
        b.write_bytes(data)

    swapped = _rewrite(bundle, tmp_path / "swapped", swap)
    with pytest.raises(BundleError, match="the ort forward program takes .* inputs, the manifest lists"):
        open_backend("ort", swapped)

    def garble(root):
        (root / m.artifacts["executorch.program"]).write_bytes(b"not a program" * 100)
        (root / m.artifacts["ort.forward"]).write_bytes(b"not a model" * 100)

    garbled = _rewrite(bundle, tmp_path / "garbled", garble)
    with pytest.raises(BackendError, match="ExecuTorch cannot load it"):
        open_backend("executorch", garbled)
    with pytest.raises(BackendError, match="ONNX Runtime cannot load it"):
        open_backend("ort", garbled)


@pytest.mark.parametrize("bundle", FAST, indirect=True, ids=bundle_id)
@pytest.mark.parametrize("name", BACKENDS)
def test_backend_trains_where_torch_cannot_be_imported(bundle, name, tmp_path):
    # ExecuTorch through flexsfl's C shim (built here into an empty cache), not the torch-linked bindings.
    script = textwrap.dedent(
        """
        import json
        import numpy as np
        from flexsfl.edge_runtime.backends import open_backend
        from flexsfl.core.bundle import load_bundle
        from flexsfl.edge_runtime.optim import AdamW

        bundle = load_bundle(_sys.argv[1])
        be = open_backend(_sys.argv[2], bundle, threads=1)
        ids = np.arange(2 * 9, dtype=np.int64).reshape(2, 9) + 1000
        mask = np.ones_like(ids)
        before = be.get_params()
        z = be.forward(ids, mask)
        AdamW(1e-2).step(be.params, be.backward(np.ones_like(z)))
        changed = all(not np.array_equal(before[n], be.params[n]) for n in before)
        print(json.dumps({"z": list(z.shape), "changed": changed, "torch": "torch" in _sys.modules,
                          "tried": BLOCKED_ATTEMPTS, "runtime": getattr(be, "runtime", None),
                          "libtorch": [ln for ln in open("/proc/self/maps") if "libtorch" in ln][:1]}))
        """
    )
    out = run_without_torch(script, str(bundle.root), name, extra_env={"FLEXSFL_CACHE": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["z"] == [2, 9, bundle.manifest.model.hidden_size] and res["changed"]
    assert not res["torch"] and not res["libtorch"]
    if name == "executorch":  # (onnxruntime-training's import tries torch on x86 and goes on without it)
        assert not res["tried"]
    assert res["runtime"] == {"ort": None, "executorch": "shim"}[name]


@pytest.mark.parametrize("bundle", [("gpt2", 1), ("llama", 1)], indirect=True, ids=bundle_id)
def test_ort_sessions_share_one_copy_of_the_weights_and_match_separate_ones_bit_for_bit(bundle):
    # GPT-2's Conv1D reads its weight as it is in the forward (Gemm) and transposed in the
    # backward; Llama reads both ways with MatMul: both must share one stored matrix.
    from flexsfl.edge_runtime.backends.ort import OrtBackend

    shared = OrtBackend(bundle, threads=1)
    separate = OrtBackend(bundle, threads=1, share_weights=False)
    values = {role: len(v) for role, v in shared._initializers.items()}
    assert values["ort.forward"] > 0 and values["ort.backward"] > 0 and not any(separate._initializers.values())
    index = json.loads(bundle.path("ort.weights_index").read_text())["programs"]
    fwd, bwd = (index[bundle.path(f"ort.{m}").name] for m in ("forward", "backward"))
    # every matrix the backward reads is one the forward reads, at the same place in weights.bin
    assert {e[0] for e in bwd.values()} <= {e[0] for e in fwd.values()}
    for b, t, seed in [(1, 2, 0), (3, 17, 1)]:
        ids, mask = batch(bundle, b, t, seed)
        z1, z2 = shared.forward(ids, mask), separate.forward(ids, mask)
        g = np.random.default_rng(seed).standard_normal(z1.shape).astype(np.float32)
        g1, g2 = shared.backward(g), separate.backward(g)
        assert np.array_equal(z1, z2)
        assert all(np.array_equal(g1[n], g2[n]) for n in g1)


@pytest.mark.parametrize("bundle", [("gpt2", 1), ("llama", 1)], indirect=True, ids=bundle_id)
def test_no_onnx_program_transposes_a_stored_weight(bundle):
    # ONNX Runtime folds Transpose(initializer) into a second matrix at load: a weight read
    # transposed must be a transposed GEMM instead.
    import onnx

    for m in ("forward", "backward"):
        graph = onnx.load(bundle.path(f"ort.{m}"), load_external_data=False).graph
        stored = {t.name for t in graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
        assert stored
        assert not [n.name for n in graph.node if n.op_type == "Transpose" and n.input[0] in stored]


@pytest.mark.parametrize("bundle", FAST, indirect=True, ids=bundle_id)
def test_executorch_refuses_a_batch_larger_than_its_memory_plan_in_one_line(bundle):
    m = bundle.manifest
    planned = m.runtime["executorch"]["planned_batch"]
    assert planned == m.max_batch
    be = open_backend("executorch", bundle, threads=1)
    ids, mask = batch(bundle, planned, 8, 0)
    assert be.forward(ids, mask).shape[0] == planned
    ids, mask = batch(bundle, planned + 1, 8, 0)
    with pytest.raises(ConfigError) as e:
        be.forward(ids, mask)
    assert "\n" not in str(e.value) and f"outside this bundle's limits (1..{planned} x" in str(e.value)
