"""The U-shaped top's programs against eager autograd.

Tops come from the real partitioner over MiniLM and small random GPT-2 / Llama models. What must
hold for every top (with ``u = 0`` too, where a causal LM trains nothing and only returns dL/dH):

- ``top_train`` reproduces the task loss, the logits, ``dL/dH`` and every θ_top gradient of eager
  autograd at any batch/seq in bounds, padding included; ``top_eval`` the logits;
- both programs re-export with symbolic ``batch``/``seq`` and the declared bounds;
- the portable loss inside them is :func:`task_loss`.
"""

from __future__ import annotations

import pytest
import torch

from flexsfl.core.errors import ConfigError
from flexsfl.export.top_programs import EVAL, TRAIN, build_top_programs, export_top_programs, portable_task_loss
from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_top, task_loss

MAX_B, MAX_T = 4, 24
CASES = [("minilm", "seq_cls", 1), ("gpt2", "causal_lm", 0), ("gpt2", "seq_cls", 1), ("llama", "seq_cls", 1),
         pytest.param(("llama", "causal_lm", 2), marks=pytest.mark.slow)]
SHAPES = [(1, 2), (2, 9), (3, 17), (MAX_B, MAX_T)]
_cache: dict = {}


@pytest.fixture
def built(request, tiny_model_dirs):
    family, task, u = request.param
    if request.param not in _cache:
        lm = load_model("minilm" if family == "minilm" else str(tiny_model_dirs[family]), task=task, num_labels=3)
        top = build_top(lm, u)
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for _, p in top.trainable():
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        names = [n for n, _ in top.trainable()]
        _cache[request.param] = top, names, build_top_programs(top, names, max_batch=MAX_B, max_seq=MAX_T)
    return _cache[request.param]


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _case_id(c):
    return f"{c[0]}-{c[1]}-u{c[2]}"


@pytest.mark.parametrize("built", CASES, indirect=True, ids=_case_id)
def test_programs_equal_eager_autograd(built):
    top, names, progs = built
    named = dict(top.named_parameters())
    for b, t in SHAPES:
        h, mask, labels, *params = progs.example_train_args(b, t, seed=b * 100 + t)
        if top.task == "causal_lm" and b == 1:
            mask[:] = 1  # a lone half-padded row would leave too few labelled positions at t = 2
            labels = torch.randint(0, progs.num_classes, (b, t))
        with torch.no_grad():
            loss, logits, grad_h, *grads = progs.train(h, mask, labels, *params)
            (ev,) = progs.eval(h, mask, *params)
        hh = h.clone().requires_grad_(True)
        want_logits = top(hh, mask)
        want_loss = task_loss(want_logits, labels, top.task)
        want = torch.autograd.grad(want_loss, [hh, *(named[n] for n in names)])
        assert _rel(loss, want_loss) <= 1e-5 and _rel(logits, want_logits) <= 1e-5 and _rel(ev, want_logits) <= 1e-5
        assert grad_h.shape == h.shape and _rel(grad_h, want[0]) <= 1e-4, (b, t)
        assert len(grads) == len(names)
        for n, g, w in zip(names, grads, want[1:]):
            assert _rel(g, w) <= 1e-4, (n, b, t)


@pytest.mark.parametrize("built", CASES[:2], indirect=True, ids=_case_id)
def test_programs_reexport_with_dynamic_batch_and_seq(built):
    _, names, progs = built
    eps = export_top_programs(progs)  # checks every named dim stays symbolic with its bounds
    assert set(eps) == {TRAIN, EVAL}
    assert [t.name for t in progs.train_spec.outputs[:3]] == ["loss", "logits", "grad_h"]
    assert len(progs.train_spec.inputs) == 3 + len(names) and len(progs.eval_spec.inputs) == 2 + len(names)


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_portable_loss_is_the_task_loss(task):
    gen = torch.Generator().manual_seed(0)
    if task == "seq_cls":
        logits, labels = 4 * torch.randn(5, 7, generator=gen), torch.randint(0, 7, (5,), generator=gen)
    else:
        logits, labels = 4 * torch.randn(3, 6, 11, generator=gen), torch.randint(0, 11, (3, 6), generator=gen)
        labels[1, 2:] = -100
    a, b = logits.clone().requires_grad_(True), logits.clone().requires_grad_(True)
    la, lb = portable_task_loss(a, labels, task), task_loss(b, labels, task)
    la.backward(), lb.backward()
    assert _rel(la, lb) <= 1e-6 and _rel(a.grad, b.grad) <= 1e-6


def test_bad_arguments(tiny_model_dirs):
    top = build_top(load_model(str(tiny_model_dirs["gpt2"]), num_labels=3), 1)
    with pytest.raises(ConfigError, match="no parameter"):
        build_top_programs(top, ["nope"], max_batch=2, max_seq=8)
    with pytest.raises(ConfigError, match="max_seq"):
        build_top_programs(top, [], max_batch=2, max_seq=1)


def test_export_refuses_a_layout_that_leaves_the_server_no_block(tiny_model_dirs, tmp_path):
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    with pytest.raises(ConfigError, match="at least one block") as e:  # 4 blocks: split 2 + top 2 leaves none
        export_bundle(ExportConfig(model=str(tiny_model_dirs["gpt2"]), split=2, top=2, out=str(tmp_path / "b")),
                      progress=False)
    assert "\n" not in str(e.value) and not (tmp_path / "b").exists()
    with pytest.raises(ConfigError, match="top must be an int >= 0"):
        ExportConfig(model="x", split=1, out="o", top=-1)


def test_a_tied_lm_head_is_stored_once_in_the_ort_bundle(tiny_model_dirs, tmp_path):
    """A causal LM whose output matrix is its embedding (SmolLM2): the head's embedding and the top's
    LM head are one [V, d] tensor in ``ort/weights.bin``, read by the forward, backward and both top
    programs."""
    import json
    import shutil

    from flexsfl.export.pipeline import ExportConfig, export_bundle

    src = tiny_model_dirs["gpt2"]
    tied = tmp_path / "tied-gpt2"
    shutil.copytree(src, tied)
    cfg = json.loads((tied / "config.json").read_text())
    cfg["tie_word_embeddings"] = True
    (tied / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "b"
    export_bundle(ExportConfig(model=str(tied), task="causal_lm", split=1, top=1, backend="ort", out=str(out)), progress=False)
    index = json.loads((out / "ort" / "weights.json").read_text())
    vocab, d = cfg["vocab_size"], cfg["n_embd"]
    big = {tuple(e[:2]) for prog in index["programs"].values() for e in prog.values()
           if sorted(e[3]) == sorted([vocab, d])}  # (offset, bytes) of every [V, d] (or [d, V]) use
    users = [p for p, entries in index["programs"].items() if any(sorted(e[3]) == sorted([vocab, d]) for e in entries.values())]
    assert len(big) == 1, big  # one stored matrix ...
    assert {"forward.onnx", "top_train.onnx", "top_eval.onnx"} <= set(users)  # ... that the head and the top both read
    assert (out / "ort" / "weights.bin").stat().st_size < 1.5 * vocab * d * 4
