"""FullModelTrainer (the FedAvg / local-only baselines' device side) on a tiny Llama bundle.

A round of local steps equals the same SGD steps done by hand with torch on the same batches
(the trainer's documented order: :class:`BatchCursor` with its seed), lowers the training loss,
uploads every trainable tensor, and ``evaluate`` counts what a hand-written argmax counts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexsfl.core.bundle import load_bundle
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.edge_runtime.trainer import BatchCursor, RoundSettings
from flexsfl.model.loading import LoraSettings, load_model
from flexsfl.model.partition import canonical_names
from flexsfl.sim.full_trainer import FullModelTrainer

POS = ["good", "great", "lovely", "wonderful", "fine", "superb"]
NEG = ["bad", "awful", "boring", "dull", "poor", "terrible"]
TRAIN = [Example(f"a {w} film", 1) for w in POS] + [Example(f"a {w} film", 0) for w in NEG]
TEST = [Example(f"the {w} story", 1) for w in POS[:4]] + [Example(f"the {w} story", 0) for w in NEG[:3]]
STEPS, BATCH, LR, SEED = 12, 4, 0.01, 3


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("llama", 2, "ort"))


def _reference(bundle):
    """The bundle's model, loaded as the trainer documents it (model id, LoRA, export seed)."""
    m = bundle.manifest
    lora = LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules)
    lm = load_model(m.model.id, task=m.model.task, num_labels=m.model.num_labels, lora=lora,
                    seed=int(m.extra.get("seed", 0)), attn_implementation="sdpa")
    names = canonical_names(lm.model)
    return lm.model, {names[id(p)]: p for p in lm.model.parameters() if p.requires_grad}


def _tokens(bundle, examples):
    enc = TextEncoder.from_bundle(bundle).encode([e.text for e in examples])
    return torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask), torch.tensor([e.label for e in examples])


def _mean_loss(model, bundle, examples) -> float:
    ids, mask, y = _tokens(bundle, examples)
    with torch.no_grad():
        return torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y).item()


def _set(params, values):
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(torch.from_numpy(np.asarray(values[n], dtype=np.float32)))


@pytest.fixture(scope="module")
def trained(bundle):
    t = FullModelTrainer(bundle, TRAIN, TEST, seed=SEED, threads=1)
    before = {n: p.detach().numpy().copy() for n, p in t.params.items()}
    t.begin_round(RoundSettings(round_id=0, local_steps=STEPS, batch_size=BATCH, lr=LR, optimizer="sgd", align_lambda=0.0,
                                personal=True), None)
    t.train_local()
    params, n = t.upload()
    stats = t.stats
    t.end_round()
    return t, before, params, n, stats


def test_a_round_equals_the_same_sgd_steps_by_hand(bundle, trained):
    _, before, params, n, stats = trained
    model, ref = _reference(bundle)
    for name, p in ref.items():  # the trainer starts from the bundle's model, as the reference does
        np.testing.assert_array_equal(p.detach().numpy(), before[name], err_msg=name)
    opt = torch.optim.SGD(list(ref.values()), lr=LR)
    cursor = BatchCursor(TRAIN, SEED)
    losses = []
    for _ in range(STEPS):
        ids, mask, y = _tokens(bundle, cursor.next(BATCH))
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(input_ids=ids, attention_mask=mask).logits, y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for name, p in ref.items():
        np.testing.assert_allclose(params[name], p.detach().numpy(), rtol=1e-4, atol=1e-6, err_msg=name)
    assert stats.steps == STEPS and n == stats.samples == STEPS * BATCH
    assert stats.loss_sum == pytest.approx(sum(losses), rel=1e-4)


def test_a_round_lowers_the_training_loss(bundle, trained):
    _, before, params, _, _ = trained
    model, ref = _reference(bundle)
    _set(ref, before)
    start = _mean_loss(model, bundle, TRAIN)
    _set(ref, params)
    end = _mean_loss(model, bundle, TRAIN)
    assert end < start - 0.02, (start, end)


def test_upload_holds_every_trainable_tensor(bundle, trained):
    _, before, params, _, _ = trained
    _, ref = _reference(bundle)
    assert set(params) == set(ref)
    L = bundle.manifest.model.num_blocks
    for j in range(L):  # every block's adapters, not only the head's: the whole model trains here
        assert any(f"layers.{j}." in n and "lora_A" in n for n in params) and any(f"layers.{j}." in n and "lora_B" in n for n in params)
    assert [n for n in params if "lora_" not in n], "the task head is trained and uploaded too"
    for name, a in params.items():
        assert a.shape == tuple(ref[name].shape) and a.dtype == np.float32
    assert all(not np.array_equal(params[n], before[n]) for n in params if "lora_B" in n)


def test_evaluate_counts_the_argmax_hits_on_the_test_split(bundle, trained):
    t, _, params, _, _ = trained
    correct, total, nll = t.evaluate()
    assert nll == 0.0  # a classifier has no perplexity
    model, ref = _reference(bundle)
    _set(ref, params)
    ids, mask, y = _tokens(bundle, TEST)
    with torch.no_grad():
        hits = int((model(input_ids=ids, attention_mask=mask).logits.argmax(-1) == y).sum())
    assert (correct, total) == (hits, len(TEST))


def test_the_next_round_keeps_or_replaces_the_model_as_told(bundle):
    t = FullModelTrainer(bundle, TRAIN, TEST, seed=SEED, threads=1)
    settings = dict(local_steps=1, batch_size=BATCH, lr=LR, optimizer="sgd", align_lambda=0.0)
    sent = {n: np.full(p.shape, 0.01 * k, np.float32) for k, (n, p) in enumerate(t.params.items())}
    t.begin_round(RoundSettings(round_id=0, personal=True, **settings), sent)  # first round: start from what was sent
    assert all(np.array_equal(t.params[n].detach().numpy(), sent[n]) for n in sent)
    t.train_local()
    own = t.upload()[0]
    t.end_round()
    t.begin_round(RoundSettings(round_id=1, personal=True, **settings), sent)  # personal: keeps its own model
    assert all(np.array_equal(t.params[n].detach().numpy(), own[n]) for n in own)
    t.end_round()
    t.begin_round(RoundSettings(round_id=2, personal=False, **settings), sent)  # not personal: the global one
    assert all(np.array_equal(t.params[n].detach().numpy(), sent[n]) for n in sent)
