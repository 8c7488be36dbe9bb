"""The server's middle (U-shaped topology): split training equals centralized, batching and interleaving
keep each client's dL/dZ its own, bounded memory, and bad backward halves change nothing."""

import gc
import weakref

import numpy as np
import pytest
import torch

from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import load_model
from flexsfl.model.partition import build_head, build_middle, build_top, task_loss
from flexsfl.server_backend.middle_host import MiddleBackward, MiddleHost, MiddleRequest
from flexsfl.server_backend.tail_host import OptimizerConfig, TailHost
from tests.server_backend.test_tail_host import _batches


@pytest.fixture(scope="module")
def tiny_llama(tiny_model_dirs):
    return str(tiny_model_dirs["llama"])


def _perturb(lm, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lm.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=g))


def _rel(a, b):
    a, b = torch.as_tensor(a).detach(), torch.as_tensor(b).detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def _trainable(lm):
    return {n: p for n, p in lm.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("recompute", [False, True])
def test_u_shaped_training_equals_centralized(tiny_llama, recompute):
    # Two clients at different (s, u) take turns; the device's head and top run eagerly here (the
    # programs are checked against eager elsewhere), the middle on the host. Every adapter must
    # match centralized SGD on the same batches after the steps.
    lr, steps = 0.05, 6
    central, split = load_model(tiny_llama, num_labels=3), load_model(tiny_llama, num_labels=3)
    _perturb(central), _perturb(split)
    host = MiddleHost(TailHost(split, OptimizerConfig("sgd", lr)), recompute=recompute)
    opt_c = torch.optim.SGD(list(_trainable(central).values()), lr=lr)
    clients = [(1, 1), (2, 0)]
    for step, (ids, mask, y) in enumerate(_batches(steps)):
        s, u = clients[step % 2]
        opt_c.zero_grad()
        task_loss(central.model(input_ids=ids, attention_mask=mask).logits, y, "seq_cls").backward()
        opt_c.step()
        head, top = build_head(split, s), build_top(split, u)
        z = head(ids, mask)
        (fwd,) = host.forward_batch([MiddleRequest(("c", step), s, u, z.detach().numpy(), mask.numpy())])
        assert fwd.error is None
        h = torch.from_numpy(fwd.h).requires_grad_(True)
        loss = top.loss(top(h, mask), y)
        device = [p for _, p in head.trainable()] + [p for _, p in top.trainable()]
        gh, *gtop = torch.autograd.grad(loss, [h, *(p for _, p in top.trainable())])
        (res,) = host.backward_batch([MiddleBackward(("c", step), gh.numpy())])
        assert res.error is None and res.g.shape == z.shape
        ghead = torch.autograd.grad(z, [p for _, p in head.trainable()], torch.from_numpy(res.g))
        with torch.no_grad():
            for p, g in zip(device, [*ghead, *gtop]):
                p -= lr * g
    want, got = _trainable(central), _trainable(split)
    for n in want:
        assert _rel(got[n], want[n]) <= 1e-5, n
    assert not host.pending


def test_batched_and_interleaved_clients_get_exactly_their_own_gradients(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    _perturb(lm)
    host = MiddleHost(TailHost(lm, OptimizerConfig("sgd", 0.1)))
    ids_a, mask_a, _ = _batches(1, t=9)[0]
    ids_b, mask_b, _ = _batches(1, b=3, t=6, seed=5)[0]
    za = build_head(lm, 1)(ids_a, mask_a).detach()
    zb = build_head(lm, 2)(ids_b, mask_b).detach()
    gen = torch.Generator().manual_seed(3)
    ga, gb = torch.randn(za.shape, generator=gen), torch.randn(zb.shape, generator=gen)

    def alone(z, mask, s, u, g):  # what each client gets from the weights its forward saw
        z = z.clone().requires_grad_(True)
        h = build_middle(lm, s, u)(z, mask)
        return h.detach().numpy(), torch.autograd.grad(h, z, g)[0].numpy()

    want_a, want_b = alone(za, mask_a, 1, 1, ga), alone(zb, mask_b, 2, 0, gb)
    # One batched forward for both; B's backward (and its optimizer step) lands before A's.
    fa, fb = host.forward_batch([MiddleRequest("a", 1, 1, za.numpy(), mask_a.numpy()),
                                 MiddleRequest("b", 2, 0, zb.numpy(), mask_b.numpy())])
    assert _rel(fa.h, want_a[0]) <= 1e-6 and _rel(fb.h, want_b[0]) <= 1e-6
    before = {n: p.detach().clone() for n, p in host.host.params.items()}
    (rb,) = host.backward_batch([MiddleBackward("b", gb.numpy())])
    assert any(not torch.equal(before[n], p) for n, p in host.host.params.items())  # B's step moved the middle
    (ra,) = host.backward_batch([MiddleBackward("a", ga.numpy())])
    assert _rel(rb.g, want_b[1]) <= 1e-5 and _rel(ra.g, want_a[1]) <= 1e-5
    assert not host.pending


def test_bad_backward_halves_are_refused_and_change_nothing(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    now = [0.0]
    host = MiddleHost(TailHost(lm, OptimizerConfig("sgd", 0.1)), ttl_s=10, max_pending=3, clock=lambda: now[0])
    ids, mask, _ = _batches(1)[0]
    z = build_head(lm, 1)(ids, mask).detach().numpy()
    m = mask.numpy()
    fwd = host.forward_batch([MiddleRequest(k, 1, 1, z, m) for k in ("a", "b", "late")])
    assert all(f.error is None for f in fwd)
    (full,) = host.forward_batch([MiddleRequest("d", 1, 1, z, m)])
    assert "unfinished" in full.error and full.h is None
    before = {n: p.detach().clone() for n, p in host.host.params.items()}
    good = np.ones_like(z)
    nan = good.copy()
    nan[0, 0, 0] = np.nan
    res = host.backward_batch([
        MiddleBackward("a", good[:, :5]),  # wrong shape
        MiddleBackward("a", nan),  # NaN
        MiddleBackward("never", good),  # never sent
    ])
    assert [r.g for r in res] == [None] * 3
    assert "float32" in res[0].error and "NaN" in res[1].error and "no middle forward" in res[2].error
    assert all("\n" not in r.error for r in res)
    assert all(torch.equal(before[n], p) for n, p in host.host.params.items())
    assert set(host.pending) == {"a", "b", "late"}  # a refused half keeps its forward for a retry
    now[0] = 5.0
    ok_a, ok_b = host.backward_batch([MiddleBackward("a", good), MiddleBackward("b", good)])  # others train on
    assert ok_a.error is None and ok_b.error is None
    now[0] = 20.0
    (late,) = host.backward_batch([MiddleBackward("late", good)])
    assert "after the deadline" in late.error and not host.pending


def test_bad_forward_halves_and_settings(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    host = MiddleHost(TailHost(lm))
    z = np.zeros((2, 4, lm.info.hidden_size), np.float32)
    m = np.ones((2, 4), np.int64)
    bad = host.forward_batch([
        MiddleRequest("x", 3, 1, z, m),  # no middle block left
        MiddleRequest("y", 1, 1, z[:, :, :5], m),
        MiddleRequest("z", 1, 1, np.full_like(z, np.nan), m),
        MiddleRequest("ok", 1, 1, z, m),
        MiddleRequest("ok", 1, 1, z, m),  # the same step twice
    ])
    assert "at least one block" in bad[0].error and "[B, T," in bad[1].error and "finite" in bad[2].error
    assert bad[3].error is None and "already" in bad[4].error
    with pytest.raises(ConfigError):
        MiddleHost(TailHost(lm), ttl_s=0)
    # evaluation keeps nothing and equals the training forward
    h = host.predict(1, 1, z + 1, m)
    assert np.array_equal(h, host.forward_batch([MiddleRequest("e", 1, 1, z + 1, m)])[0].h)
    with pytest.raises(ConfigError, match="at least one block"):
        host.predict(3, 1, z, m)


def test_recompute_holds_less_than_the_graph_and_both_free_everything(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    ids, mask, _ = _batches(1, b=4, t=32)[0]
    z = build_head(lm, 1)(ids, mask).detach().numpy()
    held = {}
    for recompute in (False, True):
        host = MiddleHost(TailHost(lm, OptimizerConfig("sgd", 0.0 + 1e-9)), recompute=recompute)
        host.forward_batch([MiddleRequest("a", 1, 0, z, mask.numpy())])
        held[recompute] = host.held_bytes()
        assert held[recompute] >= z.nbytes
        host.backward_batch([MiddleBackward("a", np.ones_like(z))])
        assert host.held_bytes() == 0
    assert held[True] < held[False] / 3  # Z + mask + adapters vs. every saved activation of 2 blocks


def test_a_kept_graph_is_really_freed_after_its_backward(tiny_llama):
    """held_bytes() said 0 while the memory stayed: the byte-counting pack hook kept each saved output
    with its own grad_fn, a C++ cycle gc cannot break, so every kept graph of a U-shaped step leaked
    (~10 MB a MiniLM step: a U server grew ~200 MB a round). Now the graph dies with its last use."""
    lm = load_model(tiny_llama, num_labels=3)
    ids, mask, _ = _batches(1, b=4, t=32)[0]
    z = build_head(lm, 1)(ids, mask).detach().numpy()
    host = MiddleHost(TailHost(lm, OptimizerConfig("sgd", 1e-3)))

    def live_tensors() -> int:
        gc.collect()
        return sum(isinstance(o, torch.Tensor) for o in gc.get_objects())

    host.forward_batch([MiddleRequest(("c", 0, 0), 1, 0, z, mask.numpy())])
    host.backward_batch([MiddleBackward(("c", 0, 0), np.ones_like(z))])
    before = live_tensors()
    for step in range(1, 6):
        host.forward_batch([MiddleRequest(("c", 0, step), 1, 0, z, mask.numpy())])
        graph = weakref.ref(host.pending["c", 0, step].batch.h)
        host.backward_batch([MiddleBackward(("c", 0, step), np.ones_like(z))])
        gc.collect()
        assert graph() is None, f"step {step}: the forward's graph outlived its backward"
    assert live_tensors() <= before  # nothing accumulates step after step


def test_a_timer_frees_late_forwards_which_stay_late_and_a_leaving_client_frees_its_own(tiny_llama):
    lm = load_model(tiny_llama, num_labels=3)
    now = [0.0]
    host = MiddleHost(TailHost(lm, OptimizerConfig("sgd", 0.1)), ttl_s=10, clock=lambda: now[0])
    ids, mask, _ = _batches(1)[0]
    z, m = build_head(lm, 1)(ids, mask).detach().numpy(), mask.numpy()
    host.forward_batch([MiddleRequest(k, 1, 1, z, m) for k in (("a", 0, 0), ("b", 0, 0), ("b", 0, 1))])
    now[0] = 11.0
    assert host.expire() == [("a", 0, 0), ("b", 0, 0), ("b", 0, 1)] and host.held_bytes() == 0  # as the server's timer does
    (late,) = host.backward_batch([MiddleBackward(("a", 0, 0), np.ones_like(z))])
    assert "after the deadline" in late.error  # freed earlier by the timer, still told it was late
    host.forward_batch([MiddleRequest(k, 1, 1, z, m) for k in (("a", 0, 1), ("b", 0, 2))])
    assert host.forget("b") == 1 and set(host.pending) == {("a", 0, 1)}
