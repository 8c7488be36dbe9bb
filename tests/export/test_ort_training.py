"""ORT's standard training artifacts train a head exactly as eager torch does.

For BERT (real all-MiniLM-L6-v2 weights), GPT-2 and Llama heads at two split points, loaded with
``onnxruntime.training.api``: smashed data and every LoRA gradient match ``torch.autograd`` on
padded batches of several shapes, five SGD steps match ``torch.optim.SGD``, five AdamW steps
match ``torch.optim.AdamW``, and the eval model computes with the trained weights.
"""

import contextlib

import numpy as np
import onnx
import pytest
import torch
from onnxruntime.training.api import CheckpointState, Module, Optimizer

from flexsfl.core.bundle import TensorSpec
from flexsfl.core.errors import ConfigError, ExportError
from flexsfl.model.loading import load_model
from flexsfl.export.ort_training import ADAMW_HYPERPARAMETERS, OrtTrainingArtifacts, build_ort_training_artifacts
from flexsfl.model.partition import build_head

SPLITS = (1, 3)
RTOL = 1e-4
MAX_BATCH, MAX_SEQ = 8, 64


def _perturb(lm, seed=1):
    # PEFT starts lora_B at zero, which makes every lora_A gradient zero: move the adapters so the
    # comparisons see every tensor take part.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return lm


@pytest.fixture(scope="module")
def models(tiny_model_dirs):
    """family -> LoadedModel with perturbed adapters (BERT is the real MiniLM)."""
    return {
        "bert": _perturb(load_model("minilm", num_labels=2)),
        "gpt2": _perturb(load_model(str(tiny_model_dirs["gpt2"]), num_labels=2)),
        "llama": _perturb(load_model(str(tiny_model_dirs["llama"]), num_labels=2)),
    }


@pytest.fixture(scope="module", params=[(f, s) for f in ("bert", "gpt2", "llama") for s in SPLITS], ids=lambda p: f"{p[0]}-s{p[1]}")
def built(request, models, tmp_path_factory):
    """(head, trainable names, SGD artifacts, ModelInfo) for one family and split."""
    family, split = request.param
    lm = models[family]
    head = build_head(lm, split)
    names = [n for n, _ in head.trainable()]
    out = tmp_path_factory.mktemp(f"ort-{family}-{split}")
    art = build_ort_training_artifacts(head, names, out, max_batch=MAX_BATCH, max_seq=MAX_SEQ, label=f"{family} split {split}")
    return head, names, art, lm.info


def _batch(vocab, b, t, seed):
    """Random ids and a right-padded mask: row i loses i * t // (2 b) tokens, the last row at least one."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, min(vocab, 5000), (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.int64)
    for i in range(b):
        mask[i, t - max(i * t // (2 * b), int(i == b - 1)) :] = 0
    return ids, mask


def _rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _ort(art: OrtTrainingArtifacts, lr=None):
    state = CheckpointState.load_checkpoint(str(art.checkpoint))
    module = Module(str(art.training_model), state, str(art.eval_model), device="cpu")
    optimizer = None
    if lr is not None:
        optimizer = Optimizer(str(art.optimizer_model), module)
        optimizer.set_learning_rate(lr)
    return state, module, optimizer


@contextlib.contextmanager
def _restored(params):
    """Give the trainable tensors back their values afterwards: heads share the module-wide model."""
    saved = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def test_artifacts_describe_their_programs(built):
    head, names, art, info = built
    d = info.hidden_size
    assert art.inputs == (
        TensorSpec("input_ids", "int64", ("batch", "seq")),
        TensorSpec("attention_mask", "int64", ("batch", "seq")),
        TensorSpec("server_g", "float32", ("batch", "seq", d)),
    )
    assert art.outputs == (TensorSpec("loss", "float32", ()), TensorSpec("smashed", "float32", ("batch", "seq", d)))
    assert list(art.parameters) == names
    assert set(art.files) == {"ort.training", "ort.eval", "ort.optimizer", "ort.checkpoint"}
    assert all(size > 0 for size in art.sizes.values())
    assert sorted(p.name for p in art.training_model.parent.iterdir()) == sorted(p.name for p in art.files.values())
    for path in (art.training_model, art.eval_model, art.optimizer_model):
        assert onnx.load(path, load_external_data=False).ir_version <= 10  # what onnxruntime 1.19 loads
    assert set(art.timings) == {"export", "prepare", "generate", "verify"}
    state = CheckpointState.load_checkpoint(str(art.checkpoint))
    trainable = {n for n, p in state.parameters if p.requires_grad}
    frozen = {n for n, p in state.parameters if not p.requires_grad}
    assert trainable == {art.parameters[n] for n in names}
    # The frozen weights live in the checkpoint (shared by both models), not inside the graphs;
    # the only ones missing are zero biases, which the graph optimizer drops as no-ops.
    head_frozen = {n: p for n, p in head.named_parameters() if not p.requires_grad}
    assert frozen <= set(head_frozen)
    assert all(not head_frozen[n].any() for n in set(head_frozen) - frozen)


def test_gradients_and_smashed_match_autograd_at_several_shapes(built):
    head, names, art, info = built
    state, module, _ = _ort(art)
    params = dict(head.named_parameters())
    module.train()
    for seed, (b, t) in enumerate([(1, 5), (3, 11), (MAX_BATCH, 37)]):
        ids, mask = _batch(info.vocab_size, b, t, seed)
        g = torch.randn(b, t, info.hidden_size, generator=torch.Generator().manual_seed(100 + seed))
        z = head(ids, mask)
        want = torch.autograd.grad(z, [params[n] for n in names], grad_outputs=g)
        module.lazy_reset_grad()
        loss, smashed = module(ids.numpy(), mask.numpy(), g.numpy())
        assert smashed.shape == (b, t, info.hidden_size)
        assert _rel(smashed, z.detach()) <= RTOL
        assert _rel(loss, (z * g).sum().detach()) <= RTOL
        for n, w in zip(names, want):
            assert _rel(state.parameters[art.parameters[n]].grad, w) <= RTOL, f"{n} at B={b} T={t}"


def _train_both(head, names, art, info, make_torch_optimizer, lr, steps=5):
    """``steps`` steps, a new batch and G each, on ORT and on torch; returns (ORT state, module)."""
    state, module, optimizer = _ort(art, lr)
    params = dict(head.named_parameters())
    torch_opt = make_torch_optimizer([params[n] for n in names], lr)
    module.train()
    for step in range(steps):
        ids, mask = _batch(info.vocab_size, 2 + step % 2, 9 + 3 * step, 10 + step)
        g = torch.randn(ids.shape[0], ids.shape[1], info.hidden_size, generator=torch.Generator().manual_seed(200 + step))
        module(ids.numpy(), mask.numpy(), g.numpy())
        optimizer.step()
        module.lazy_reset_grad()
        torch_opt.zero_grad()
        (head(ids, mask) * g).sum().backward()
        torch_opt.step()
    return state, module


def test_five_sgd_steps_match_torch_sgd_and_eval_uses_trained_weights(built):
    head, names, art, info = built
    params = dict(head.named_parameters())
    before = {n: params[n].detach().clone() for n in names}
    ids, mask = _batch(info.vocab_size, 3, 13, 99)
    zero_g = np.zeros((3, 13, info.hidden_size), np.float32)
    with _restored([params[n] for n in names]):
        z_before = head(ids, mask).detach()
        state, module = _train_both(head, names, art, info, lambda ps, lr: torch.optim.SGD(ps, lr=lr), lr=1e-3)
        for n in names:
            got = state.parameters[art.parameters[n]].data
            assert _rel(got, params[n].detach()) <= RTOL, n
            # the step itself, not only the (dominant) starting value, agrees
            assert _rel(got - before[n].numpy(), params[n].detach() - before[n]) <= 1e-3, n
        module.eval()
        _, smashed = module(ids.numpy(), mask.numpy(), zero_g)
        z_after = head(ids, mask).detach()
        assert _rel(smashed, z_after) <= RTOL
        assert _rel(z_after, z_before) > 1e-4  # the trained weights changed z, and eval saw it


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_model_dirs):
    return _perturb(load_model(str(tiny_model_dirs["gpt2"]), num_labels=2))


def test_five_adamw_steps_match_torch_adamw(tiny_gpt2, tmp_path):
    head = build_head(tiny_gpt2, 1)
    names = [n for n, _ in head.trainable()]
    art = build_ort_training_artifacts(head, names, tmp_path, max_batch=MAX_BATCH, max_seq=MAX_SEQ, optimizer="adamw")
    assert art.optimizer == {"name": "adamw", **ADAMW_HYPERPARAMETERS}
    params = dict(head.named_parameters())
    h = ADAMW_HYPERPARAMETERS

    def adamw(ps, lr):
        return torch.optim.AdamW(ps, lr=lr, betas=h["betas"], eps=h["eps"], weight_decay=h["weight_decay"])

    before = {n: params[n].detach().clone() for n in names}
    with _restored([params[n] for n in names]):
        state, _ = _train_both(head, names, art, tiny_gpt2.info, adamw, lr=1e-2)
        for n in names:
            got = state.parameters[art.parameters[n]].data
            assert _rel(got, params[n].detach()) <= RTOL, n
            assert _rel(got - before[n].numpy(), params[n].detach() - before[n]) <= 1e-3, n


def test_peft_default_init_keeps_every_adapter_and_the_callers_state(tiny_model_dirs, tmp_path, monkeypatch):
    # Untouched PEFT adapters: every lora_B is zero, so equal initializers must not be merged.
    lm = load_model(str(tiny_model_dirs["llama"]), num_labels=2)
    head = build_head(lm, 1)
    names = [n for n, _ in head.trainable()]
    head.train()
    # onnxblock deletes ./temp.onnx when its blocks are collected; a user's file of that name survives
    monkeypatch.chdir(tmp_path)
    (tmp_path / "temp.onnx").write_bytes(b"user data")
    art = build_ort_training_artifacts(head, names, tmp_path / "out", max_batch=4, max_seq=32, optimizer="sgd")
    assert (tmp_path / "temp.onnx").read_bytes() == b"user data"
    assert all(m.training for m in head.modules())  # the head's modes are given back
    head.eval()
    state, module, optimizer = _ort(art, lr=0.1)
    assert {n for n, p in state.parameters if p.requires_grad} == set(names)
    ids, mask = _batch(lm.info.vocab_size, 2, 8, 0)
    module.train()
    module(ids.numpy(), mask.numpy(), np.ones((2, 8, lm.info.hidden_size), np.float32))
    optimizer.step()
    for n in names:
        moved = np.abs(state.parameters[n].data - dict(head.named_parameters())[n].detach().numpy()).max()
        assert (moved > 0) == ("lora_B" in n), n  # with B = 0 only B gets a gradient, every B its own


def test_bad_arguments_are_config_errors(tiny_gpt2, tmp_path):
    head = build_head(tiny_gpt2, 1)
    names = [n for n, _ in head.trainable()]
    frozen = next(n for n, p in head.named_parameters() if not p.requires_grad)
    cases = [
        (dict(optimizer="adam"), "optimizer 'adam'"),
        (dict(param_names=[]), "param_names is empty"),
        (dict(param_names=names + names[:1]), "twice"),
        (dict(param_names=["blocks.0.nope"]), "no parameter 'blocks.0.nope'"),
        (dict(param_names=[frozen]), "does not require grad"),
        (dict(example_batch=(1, 16)), "example_batch"),
        (dict(example_batch=(2, 100)), "example_batch"),
    ]
    for change, message in cases:
        kw = dict(param_names=names, max_batch=4, max_seq=32) | change
        with pytest.raises(ConfigError, match=message):
            build_ort_training_artifacts(head, kw.pop("param_names"), tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()


class _FixedBatchHead(torch.nn.Module):
    """A head whose forward pins the batch size with a Python int from ``.shape``.

    The exporter does not fail on it: it quietly bakes batch 2 into the graph.
    """

    def __init__(self, head):
        super().__init__()
        self.head = head

    def forward(self, input_ids, attention_mask):
        if input_ids.shape[0] != 2:
            raise ValueError("batch must be 2")
        return self.head(input_ids, attention_mask)


def test_head_that_pins_the_batch_is_one_export_error_and_leaves_out_dir_alone(tiny_gpt2, tmp_path):
    head = _FixedBatchHead(build_head(tiny_gpt2, 1))
    names = [n for n, p in head.named_parameters() if p.requires_grad]
    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(ExportError) as e:
        build_ort_training_artifacts(head, names, tmp_path, max_batch=4, max_seq=32, label="tiny-gpt2 split 1")
    message = str(e.value)
    assert message.startswith("could not build ORT training artifacts for tiny-gpt2 split 1 (export): ")
    assert "fixed dims (2, 'seq')" in message and "; try " in message and "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]
