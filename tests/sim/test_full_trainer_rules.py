"""The whole-model device's local rules (FedRep, Ditto) and its optimizer-state rule, on a tiny
Llama bundle, against a reference that computes ``∇L`` with autograd on a second copy of the
model and applies each update rule by hand in numpy (plain SGD: ``p ← p − lr·g``):

- FedRep: the head phase moves only the task head, the body phase only the body, and the round
  equals head-only then body-only SGD steps on the trainer's batches.
- Ditto: the upload is ``w`` after ``τ`` plain steps; the device then holds ``v`` after ``τ``
  steps of ``g + μ(v − w)`` (``w`` the round's global model), kept into the next round.
- Optimizer state: reset for the tensors the server replaces, kept for the device's own.
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
BATCH, LR, SEED, MU = 4, 0.05, 5, 0.7


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return load_bundle(tiny_bundles("llama", 2, "ort"))


@pytest.fixture(scope="module")
def reference(bundle):
    """A second copy of the bundle's model: ``grads(values, batch)`` -> ``∇L`` per tensor (numpy)."""
    m = bundle.manifest
    lora = LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules)
    lm = load_model(m.model.id, task=m.model.task, num_labels=m.model.num_labels, lora=lora,
                    seed=int(m.extra.get("seed", 0)), attn_implementation="sdpa")
    names = canonical_names(lm.model)
    params = {names[id(p)]: p for p in lm.model.parameters() if p.requires_grad}
    encoder = TextEncoder.from_bundle(bundle)

    def grads(values: dict[str, np.ndarray], batch: list[Example]) -> dict[str, np.ndarray]:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(torch.from_numpy(values[n]))
        enc = encoder.encode([e.text for e in batch])
        lm.model.zero_grad(set_to_none=True)
        logits = lm.model(input_ids=torch.from_numpy(enc.input_ids), attention_mask=torch.from_numpy(enc.attention_mask)).logits
        torch.nn.functional.cross_entropy(logits, torch.tensor([e.label for e in batch])).backward()
        return {n: p.grad.numpy().copy() for n, p in params.items()}

    return grads


def _snapshot(t: FullModelTrainer) -> dict[str, np.ndarray]:
    return {n: p.detach().numpy().copy() for n, p in t.params.items()}


def _settings(rule: str, steps: int, **kw) -> RoundSettings:
    return RoundSettings(round_id=kw.pop("round_id", 0), local_steps=steps, batch_size=BATCH, lr=LR, optimizer="sgd",
                         align_lambda=0.0, personal=False, local_rule=rule, **kw)


def _close(got: dict, want: dict) -> None:
    for n in want:
        np.testing.assert_allclose(got[n], want[n], rtol=1e-4, atol=1e-6, err_msg=n)


def test_fedrep_head_phase_then_body_phase_against_numpy(bundle, reference):
    t = FullModelTrainer(bundle, TRAIN, seed=SEED, threads=1)
    head = t.head_names
    assert head and all("lora_" not in n for n in head) and len(head) < len(t.params)
    start = _snapshot(t)

    # A round of head steps only: the body does not move, the head does.
    t.begin_round(_settings("fedrep", 2, head_steps=2), None)
    t.train_local()
    after_head = _snapshot(t)
    assert all(np.array_equal(after_head[n], start[n]) for n in t.params if n not in head)
    assert all(not np.array_equal(after_head[n], start[n]) for n in head)

    # A full round (2 head steps, then 3 body steps) against numpy SGD on the same batches.
    t = FullModelTrainer(bundle, TRAIN, seed=SEED, threads=1)
    t.begin_round(_settings("fedrep", 5, head_steps=2), None)
    t.train_local()
    got = _snapshot(t)
    want, cursor = {n: a.copy() for n, a in start.items()}, BatchCursor(TRAIN, SEED)
    for step in range(5):
        g = reference(want, cursor.next(BATCH))
        phase = head if step < 2 else set(want) - head
        for n in phase:
            want[n] -= LR * g[n]
    _close(got, want)
    assert t.stats.steps == 5 and t.upload()[1] == 5 * BATCH


def test_ditto_uploads_w_and_keeps_a_proximal_personal_model(bundle, reference):
    t = FullModelTrainer(bundle, TRAIN, seed=SEED, threads=1)
    rng = np.random.default_rng(0)
    w0 = {n: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in _snapshot(t).items()}
    cursor = BatchCursor(TRAIN, SEED)

    def by_hand(w: dict, v: dict) -> tuple[dict, dict]:
        """One Ditto round in numpy: τ=2 plain steps of w, then 2 steps of v with g + μ(v − w_round)."""
        wk = {n: a.copy() for n, a in w.items()}
        for _ in range(2):
            g = reference(wk, cursor.next(BATCH))
            wk = {n: wk[n] - LR * g[n] for n in wk}
        vk = {n: a.copy() for n, a in v.items()}
        for _ in range(2):
            g = reference(vk, cursor.next(BATCH))
            vk = {n: vk[n] - LR * (g[n] + MU * (vk[n] - w[n])) for n in vk}
        return wk, vk

    t.begin_round(_settings("ditto", 2, prox_mu=MU), w0)
    t.train_local()
    up, n = t.upload()
    want_w, want_v = by_hand(w0, w0)  # v starts at the first global model
    _close(up, want_w)
    _close(_snapshot(t), want_v)  # the device holds v_k: what it evaluates
    assert t.stats.steps == 4 and n == 2 * BATCH  # 2τ device steps; w's samples weigh the upload
    t.end_round()

    # Next round: a new global w; v continues from v_k, pulled towards the new w.
    w1 = {n: (a + 0.05 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in w0.items()}
    t.begin_round(_settings("ditto", 2, prox_mu=MU, round_id=1), w1)
    t.train_local()
    want_w, want_v = by_hand(w1, want_v)
    _close(t.upload()[0], want_w)
    _close(_snapshot(t), want_v)


def test_ditto_proximal_gradient_is_grad_plus_mu_times_v_minus_w():
    from flexsfl.sim.full_trainer import proximal_grad_

    rng = np.random.default_rng(3)
    v = {"a": rng.standard_normal((3, 2)).astype(np.float32), "b": rng.standard_normal(4).astype(np.float32)}
    w = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in v.items()}
    params = {n: torch.nn.Parameter(torch.from_numpy(a.copy())) for n, a in v.items()}
    loss = (params["a"] ** 3).sum() + (params["b"].sin()).sum()  # ∇: 3a², cos b
    loss.backward()
    proximal_grad_(params, {n: torch.from_numpy(a) for n, a in w.items()}, 0.3)
    np.testing.assert_allclose(params["a"].grad.numpy(), 3 * v["a"] ** 2 + 0.3 * (v["a"] - w["a"]), rtol=1e-6)
    np.testing.assert_allclose(params["b"].grad.numpy(), np.cos(v["b"]) + 0.3 * (v["b"] - w["b"]), rtol=1e-6)


def test_optimizer_state_is_reset_for_replaced_tensors_and_kept_for_own_ones(bundle):
    t = FullModelTrainer(bundle, TRAIN, seed=SEED, threads=1)
    adamw = dict(batch_size=BATCH, lr=LR, optimizer="adamw", align_lambda=0.0, personal=False)
    body = {n: p.detach().numpy().copy() for n, p in t.params.items() if n not in t.head_names}
    t.begin_round(RoundSettings(round_id=0, local_steps=2, **adamw), body)
    t.train_local()
    t.end_round()
    opt = t._opt["w"]
    assert all(p in opt.state for p in t.params.values())  # every tensor trained: moments exist
    t.begin_round(RoundSettings(round_id=1, local_steps=2, **adamw), body)  # FedPer/FedRep: the server sends the body
    for n, p in t.params.items():
        assert (p in opt.state) == (n in t.head_names), n  # the head's moments survive, the body's are fresh
