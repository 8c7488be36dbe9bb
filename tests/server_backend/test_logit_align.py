"""The logit-level alignment term on the server (TailHost, logit_kl rounds): ``g`` equals torch
autograd of ``∂L_task/∂Z + λ‖∂L_task/∂Z‖·a/‖a‖`` with ``a = ∂/∂Z`` of the per-sequence mean
``KL(softmax(tail(Z')) || softmax(tail(Z)))`` (classes, or a causal LM's vocabulary at every real
token), the tail steps on the task loss alone, and cross-client batching changes nothing."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexsfl.model.loading import load_model
from flexsfl.model.partition import task_loss
from flexsfl.server_backend.tail_host import OptimizerConfig, StepRequest, TailHost
from tests.server_backend.test_schedule import CUTS, _rel, _run
from tests.server_backend.test_tail_host import _batches

LAM = 0.3


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


def _host(path: str, task: str = "seq_cls", k: int = 1) -> TailHost:
    return TailHost(load_model(path, task=task, num_labels=3), OptimizerConfig("sgd", 0.1, server_step_every=k))


def _request(host: TailHost, split: int, b: int, t: int, seed: int, *, lam: float = LAM, ref: bool = True) -> StepRequest:
    """Z from the global head, Z' from the same head with its input perturbed (a personal head that drifted)."""
    ids, mask, y = _batches(1, b=b, t=t, seed=seed)[0]
    if host.info.task == "causal_lm":
        y = torch.where(mask.bool(), ids, torch.full_like(ids, -100))
    with torch.no_grad():
        z = host.head(split)(ids, mask).numpy()
    noise = np.random.default_rng(seed).standard_normal(z.shape).astype(np.float32)
    return StepRequest(split, z, mask.numpy(), y.numpy(), tag=f"c{seed}:0:0",
                       z_ref=(z + 0.3 * noise) if ref else None, align_lambda=lam)


def _expected(host: TailHost, req: StepRequest) -> tuple[np.ndarray, float]:
    """Autograd of the formula, written out here (KL = Σ q (log q - log p), per-sequence mean)."""
    z = torch.from_numpy(req.z.copy()).requires_grad_(True)
    mask = torch.from_numpy(req.attention_mask)
    logits = host.tail(req.split)(z, mask)
    g_task, = torch.autograd.grad(task_loss(logits, torch.from_numpy(req.labels), host.info.task), z, retain_graph=True)
    with torch.no_grad():
        ref = host.tail(req.split)(torch.from_numpy(req.z_ref), mask)
    q = torch.softmax(ref.double(), -1)
    kl = (q * (torch.log(q) - torch.log_softmax(logits.double(), -1))).sum(-1)
    if kl.dim() == 2:  # [B, T]: the mean over each sequence's real tokens, then over sequences
        m = mask.double()
        kl = (kl * m).sum(1) / m.sum(1)
    a, = torch.autograd.grad(kl.mean(), z)
    g = g_task.double() + req.align_lambda * g_task.double().norm() * a.double() / a.double().norm()
    return g.numpy(), float(kl.mean().detach())


@pytest.mark.parametrize("task", ["seq_cls", "causal_lm"])
def test_g_equals_autograd_of_the_formula_and_the_tail_steps_on_the_task_loss(tiny_llama, task):
    host, plain = _host(tiny_llama, task), _host(tiny_llama, task)
    req = _request(host, 2, 3, 9, seed=1)
    want, kl = _expected(host, req)
    got = host.train_step(req)
    assert got.error is None and _rel(got.g, want) <= 1e-5
    assert got.align_ratio == pytest.approx(LAM, rel=1e-5) and got.align_loss == pytest.approx(kl, rel=1e-6)
    assert got.align_gap > 1e-3
    # the same step without Z': the task gradient alone, and the very same tail update
    alone = plain.train_step(StepRequest(req.split, req.z, req.attention_mask, req.labels))
    assert alone.align_ratio == 0.0 and not np.allclose(alone.g, got.g, rtol=1e-3, atol=0)
    assert alone.loss == got.loss
    a, b = host.state(), plain.state()
    assert all(np.array_equal(a[n], b[n]) for n in a)


def test_no_term_when_the_heads_agree_or_lambda_is_zero(tiny_llama):
    host = _host(tiny_llama)
    req = _request(host, 1, 2, 7, seed=3)
    same = host.train_step(StepRequest(req.split, req.z, req.attention_mask, req.labels, z_ref=req.z.copy(), align_lambda=LAM))
    assert same.align_ratio == 0.0 and same.align_gap == 0.0 and same.align_loss == pytest.approx(0.0, abs=1e-12)
    host2 = _host(tiny_llama)
    zero = host2.train_step(StepRequest(req.split, req.z, req.attention_mask, req.labels, z_ref=req.z_ref, align_lambda=0.0))
    plain = _host(tiny_llama).train_step(StepRequest(req.split, req.z, req.attention_mask, req.labels))
    assert np.array_equal(zero.g, plain.g) and np.array_equal(same.g, plain.g)


@pytest.mark.parametrize("k", [1, 3])
def test_batched_equals_one_at_a_time_with_logit_alignment(tiny_llama, k):
    # Mixed requests at three splits, some aligning at the logits (different λ), some not.
    base = _host(tiny_llama)
    shapes = [(1, 2, 10, True), (2, 3, 7, False), (1, 2, 12, True), (3, 2, 9, True), (2, 3, 10, True), (1, 2, 6, False),
              (3, 2, 8, True)]
    reqs = [_request(base, s, b, t, seed=20 + i, ref=ref, lam=0.1 * (1 + i % 3)) for i, (s, b, t, ref) in enumerate(shapes)]
    runs = {}
    for name, cuts in CUTS.items():
        host = _host(tiny_llama, k=k)
        runs[name] = (_run(host, reqs, cuts), host.state())
    ref_results, ref_state = runs["one at a time"]
    assert [r.align_ratio > 0 for r in ref_results] == [s[3] for s in shapes]
    for name, (results, state) in runs.items():
        for i, (a, b) in enumerate(zip(results, ref_results)):
            assert _rel(a.g, b.g) <= 1e-6 and a.loss == pytest.approx(b.loss, rel=1e-6), (name, i)
            assert a.align_ratio == pytest.approx(b.align_ratio, rel=1e-6, abs=1e-12), (name, i)
            assert a.align_loss == pytest.approx(b.align_loss, rel=1e-5, abs=1e-12), (name, i)
        for n in ref_state:
            assert _rel(state[n], ref_state[n]) <= 1e-6, (name, n)


def test_compute_worker_batches_logit_steps_without_changing_them(tiny_llama):
    # The real worker thread: the requests wait behind a held call, so it batches them (K = 3).
    import asyncio
    import threading

    from flexsfl.server_backend.compute import ComputeWorker

    base = _host(tiny_llama)
    reqs = [_request(base, 1 + i % 2, 2, 6 + i, seed=40 + i, ref=i != 2) for i in range(5)]

    async def go(together: bool):
        host = _host(tiny_llama, k=3)
        worker = ComputeWorker(host, threads=1)
        worker.start()
        try:
            if together:
                gate = threading.Event()
                held = asyncio.ensure_future(worker.call(gate.wait))
                await asyncio.sleep(0.05)
                futs = [asyncio.ensure_future(worker.train(r)) for r in reqs]
                await asyncio.sleep(0.05)
                gate.set()
                await held
                results = await asyncio.gather(*futs)
            else:
                results = [await worker.train(r) for r in reqs]
            await worker.end_round()
            return results, host.state(), worker.batches
        finally:
            worker.stop()

    seq, bat = asyncio.run(go(False)), asyncio.run(go(True))
    assert seq[2] == 5 and bat[2] == 2  # one at a time, then one batch per schedule group
    for a, b in zip(bat[0], seq[0]):
        assert _rel(a.g, b.g) <= 1e-6 and a.align_ratio == pytest.approx(b.align_ratio, rel=1e-6, abs=1e-12)
    assert [r.align_ratio > 0 for r in seq[0]] == [i != 2 for i in range(5)]
    for n in seq[1]:
        assert _rel(bat[1][n], seq[1][n]) <= 1e-6, n
