"""The device's top (U-shaped topology) from a real ``flexsfl export --top`` bundle.

- the manifest describes both top programs exactly, and the tied LM head is stored once;
- on ONNX Runtime, in a process where torch cannot be imported, the fused train program's loss,
  logits, dL/dH and θ_top gradients and the eval program's logits equal eager PyTorch's
  (rel err <= 1e-4) for BERT (MiniLM) and a tiny GPT-2 causal LM;
- bad inputs are one-line errors that change nothing.
"""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.top import open_top
from flexsfl.export.pipeline import ExportConfig, export_bundle
from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_top, task_loss
from tests.no_torch import run_without_torch

CASES = {  # name -> (model, task, split, top)
    "gpt2-lm-s1-u1": ("gpt2", "causal_lm", 1, 1),
    "minilm-cls-s2-u1": ("minilm", "seq_cls", 2, 1),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tiny_model_dirs, tmp_path_factory):
    model, task, split, top = CASES[request.param]
    src = "minilm" if model == "minilm" else str(tiny_model_dirs[model])
    out = tmp_path_factory.mktemp("top-bundles") / request.param
    bundle, _ = export_bundle(ExportConfig(model=src, split=split, top=top, out=str(out), backend="ort", task=task,
                                           num_labels=3, max_batch=4, max_seq=24, ort_training_artifacts=False),
                              progress=False)
    return bundle, load_model(src, task=task, num_labels=3), top


def _inputs(bundle, b=3, t=11, seed=0):
    m = bundle.manifest
    rng = np.random.default_rng(seed)
    h = rng.standard_normal((b, t, m.model.hidden_size)).astype(np.float32)
    mask = np.ones((b, t), np.int64)
    mask[-1, t // 2:] = 0
    if m.model.task == "causal_lm":
        labels = rng.integers(0, m.model.num_labels, (b, t)).astype(np.int64)
        labels[mask == 0] = -100
    else:
        labels = rng.integers(0, m.model.num_labels, (b,)).astype(np.int64)
    return h, mask, labels


def _theta(bundle, backend="ort", seed=1):
    # LoRA B starts at zero (every A gradient would be zero): test with random non-zero tensors.
    rng = np.random.default_rng(seed)
    spec = bundle.manifest.program(f"{backend}.top_train").inputs[3:]
    return {t.name: (0.05 * rng.standard_normal(t.shape)).astype(np.float32) for t in spec}


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def test_manifest_describes_the_top_programs(case):
    bundle, lm, u = case
    m = bundle.manifest
    top = m.extra["top"]
    assert top["blocks"] == u and top["first_block"] == m.model.num_blocks - u
    train, ev = m.program("ort.top_train"), m.program("ort.top_eval")
    names = [p["name"] for p in top["trainable_parameters"]]
    assert [t.name for t in train.inputs[:3]] == ["h", "attention_mask", "labels"]
    assert [t.name for t in train.inputs[3:]] == names == [t.name for t in ev.inputs[2:]]
    assert [t.name for t in train.outputs] == ["loss", "logits", "grad_h", *(f"grad.{n}" for n in names)]
    assert train.outputs[2].shape == ("batch", "seq", m.model.hidden_size) and ev.outputs == train.outputs[1:2]
    import onnx

    for role, spec in (("ort.top_train", train), ("ort.top_eval", ev)):
        g = onnx.load(bundle.path(role), load_external_data=False).graph
        assert [i.name for i in g.input] == [t.name for t in spec.inputs]
        assert [o.name for o in g.output] == [t.name for t in spec.outputs]
    if m.model.task == "causal_lm":
        # GPT-2's LM head is its token embedding: one copy in weights.bin for head and top.
        matrix = m.model.vocab_size * m.model.hidden_size * 4
        assert matrix < bundle.path("ort.weights").stat().st_size < 1.5 * matrix


def test_ort_top_equals_eager_without_torch(case, tmp_path):
    bundle, lm, u = case
    h, mask, labels = _inputs(bundle)
    theta = _theta(bundle)
    np.savez(tmp_path / "in.npz", h=h, mask=mask, labels=labels, **{f"p{i}": a for i, a in enumerate(theta.values())})
    script = textwrap.dedent(
        """
        import json
        import numpy as np
        from flexsfl.core.bundle import load_bundle
        from flexsfl.edge_runtime.top import open_top

        top = open_top(load_bundle(_sys.argv[1]), "ort", threads=1)
        d = np.load(_sys.argv[2] + "/in.npz")
        names = list(top.params)
        top.set_params({n: d[f"p{i}"] for i, n in enumerate(names)})
        step = top.train_step(d["h"], d["mask"], d["labels"])
        logits = top.predict(d["h"], d["mask"])
        np.savez(_sys.argv[2] + "/out.npz", loss=step.loss, logits=step.logits, grad_h=step.grad_h, eval=logits,
                 **{f"g{i}": step.grads[n] for i, n in enumerate(names)})
        print(json.dumps({"torch": "torch" in _sys.modules}))
        """
    )
    proc = run_without_torch(script, str(bundle.root), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"torch": False}
    got = np.load(tmp_path / "out.npz")

    top = build_top(lm, u)
    own = {c: n for n, c in top.canonical().items()}
    named = dict(top.named_parameters())
    with torch.no_grad():
        for c, a in theta.items():
            named[own[c]].copy_(torch.from_numpy(a))
    ht = torch.from_numpy(h).requires_grad_(True)
    logits = top(ht, torch.from_numpy(mask))
    loss = task_loss(logits, torch.from_numpy(labels), lm.info.task)
    gh, *gp = torch.autograd.grad(loss, [ht, *(named[own[c]] for c in theta)])
    assert _rel(got["loss"], loss.item()) <= 1e-4
    assert _rel(got["logits"], logits.detach()) <= 1e-4 and _rel(got["eval"], logits.detach()) <= 1e-4
    assert _rel(got["grad_h"], gh) <= 1e-4
    for i, g in enumerate(gp):
        assert _rel(got[f"g{i}"], g) <= 1e-4


def test_bad_inputs_are_one_line_errors(case):
    bundle, _, _ = case
    top = open_top(load_bundle(bundle.root), "ort", threads=1)
    h, mask, labels = _inputs(bundle)
    before = top.get_params()
    nan = h.copy()
    nan[0, 0, 0] = np.nan
    bad_labels = labels.copy()
    bad_labels.flat[0] = 10**6
    for args in ((h[:, :, :3], mask, labels), (nan, mask, labels), (h, mask, bad_labels), (h, mask, labels[:1]),
                 (np.zeros((9, 11, h.shape[2]), np.float32), np.ones((9, 11), np.int64), labels)):
        with pytest.raises(ConfigError) as e:
            top.train_step(*args)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="do not match"):
        top.set_params({"nope": np.zeros(1, np.float32)})
    assert all(np.array_equal(before[n], a) for n, a in top.params.items())
    assert np.isfinite(top.train_step(h, mask, labels).loss)


@pytest.mark.slow
def test_executorch_top_equals_eager(tiny_model_dirs, tmp_path):
    # The top's methods live in the head's .pte (GPT-2's tied LM head shared with the embedding);
    # the same checks as ORT's, in-process (ExecuTorch needs torch), at a shape other than the traced one.
    src = str(tiny_model_dirs["gpt2"])
    bundle, _ = export_bundle(ExportConfig(model=src, split=1, top=1, out=str(tmp_path / "b"), backend="executorch",
                                           task="causal_lm", max_batch=4, max_seq=24), progress=False)
    train = bundle.manifest.program("executorch.top_train")
    assert [t.name for t in train.inputs[:3]] == ["h", "attention_mask", "labels"]
    runner = open_top(bundle, "executorch", threads=1)
    theta = _theta(bundle, "executorch")
    runner.set_params(theta)
    h, mask, labels = _inputs(bundle, b=3, t=13)
    step = runner.train_step(h, mask, labels)
    lm = load_model(src, task="causal_lm")
    top = build_top(lm, 1)
    own = {c: n for n, c in top.canonical().items()}
    named = dict(top.named_parameters())
    with torch.no_grad():
        for c, a in theta.items():
            named[own[c]].copy_(torch.from_numpy(a))
    ht = torch.from_numpy(h).requires_grad_(True)
    logits = top(ht, torch.from_numpy(mask))
    loss = task_loss(logits, torch.from_numpy(labels), "causal_lm")
    gh, *gp = torch.autograd.grad(loss, [ht, *(named[own[c]] for c in theta)])
    assert _rel(step.loss, loss.item()) <= 1e-4 and _rel(step.grad_h, gh) <= 1e-4
    assert _rel(runner.predict(h, mask), logits.detach()) <= 1e-4
    for c, g in zip(theta, gp):
        assert _rel(step.grads[c], g) <= 1e-4, c
