"""The normalized alignment term: its gradient against torch autograd, and that λ means the same
at any batch size B, sequence length T and width d (issue 18, "an alignment term that can act")."""

import numpy as np
import pytest
import torch

from flexsfl.edge_runtime.alignment import aligned_gradient, alignment_loss_and_grad, sequence_kl


def _case(b, t, d, seed=0, spread=0.5):
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((b, t, d)) * 2).astype(np.float32)
    z_ref = z + (rng.standard_normal(z.shape) * spread).astype(np.float32)
    mask = np.ones((b, t), np.int64)
    for i in range(1, b):
        mask[i, max(1, t - i):] = 0  # sequences of different lengths
    g = (rng.standard_normal(z.shape) * 1e-3).astype(np.float32) * mask[..., None]
    return z, z_ref, mask, g


def _torch_sequence_kl(z, z_ref, mask):
    """Autograd of mean_b (1/n_b) Σ_t m_bt KL(softmax(z_ref) || softmax(z))."""
    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.tensor(z_ref, dtype=torch.float64), -1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(zt, -1), q, reduction="none").sum(-1)
    m = torch.tensor(mask, dtype=torch.float64)
    loss = ((kl * m).sum(-1) / m.sum(-1).clamp(min=1)).mean()
    loss.backward()
    return loss.item(), zt.grad.numpy()


def test_sequence_kl_matches_autograd():
    z, z_ref, mask, _ = _case(4, 9, 16)
    loss, grad = sequence_kl(z, z_ref, mask)
    want_loss, want_grad = _torch_sequence_kl(z, z_ref, mask)
    assert abs(loss - want_loss) <= 1e-10 * max(1.0, want_loss)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-8, atol=1e-14)
    assert not grad[3, 6:].any()  # padding gets nothing


def test_sequence_kl_on_logits_matches_autograd():
    """The logit-level variant: [B, C] outputs, one position per sequence."""
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((5, 10)).astype(np.float32)
    ref = logits + rng.standard_normal(logits.shape).astype(np.float32)
    loss, grad = sequence_kl(logits, ref)
    want_loss, want_grad = _torch_sequence_kl(logits[:, None], ref[:, None], np.ones((5, 1)))
    assert abs(loss - want_loss) <= 1e-10 * max(1.0, want_loss)
    np.testing.assert_allclose(grad, want_grad[:, 0], rtol=1e-8, atol=1e-14)


def test_aligned_gradient_is_lambda_times_g_along_the_kl_gradient():
    z, z_ref, mask, g = _case(3, 7, 32, seed=1)
    term = aligned_gradient(g, z, z_ref, mask, 0.25)
    _, a = _torch_sequence_kl(z, z_ref, mask)
    want = 0.25 * np.linalg.norm(g.astype(np.float64)) * a / np.linalg.norm(a)
    np.testing.assert_allclose(term.grad, want, rtol=1e-5, atol=1e-12)
    assert term.ratio == pytest.approx(0.25, rel=1e-12)
    assert term.gap == pytest.approx(np.linalg.norm((z - z_ref) * mask[..., None]) / np.linalg.norm(z_ref * mask[..., None]),
                                     rel=1e-6)


@pytest.mark.parametrize("b,t,d", [(1, 4, 8), (8, 4, 8), (2, 64, 8), (2, 4, 384), (16, 48, 384)])
def test_ratio_is_lambda_at_any_batch_sequence_and_width(b, t, d):
    z, z_ref, mask, g = _case(b, t, d, seed=b + t + d)
    for lam in (0.01, 0.1, 1.0):
        assert aligned_gradient(g, z, z_ref, mask, lam).ratio == pytest.approx(lam, rel=1e-9)


def test_raw_token_mean_term_is_not_scale_invariant():
    """Why the normalization: the raw term's ‖λ a‖/‖g‖ moves with T and d (so these checks can fail)."""
    ratios = {}
    for t, d in ((4, 16), (64, 16), (4, 384)):
        z, z_ref, mask, g = _case(2, t, d, seed=7)
        mask[:] = 1
        g[:] = 0
        g[:, 0] = 1e-3  # a classifier's gradient reaches Z through one pooled position
        _, a = alignment_loss_and_grad(z, z_ref, mask)
        ratios[(t, d)] = 0.1 * np.linalg.norm(a) / np.linalg.norm(g)
        assert aligned_gradient(g, z, z_ref, mask, 0.1).ratio == pytest.approx(0.1, rel=1e-9)
    assert ratios[(64, 16)] < ratios[(4, 16)] / 2 and ratios[(4, 384)] < ratios[(4, 16)] / 2, ratios


def test_batch_repetition_and_padding_change_nothing():
    """B: a batch repeated twice (g halves under a mean-over-B loss) gives half the upstream
    gradient per sequence, exactly as g itself; T: extra padding leaves real positions unchanged."""
    z, z_ref, mask, g = _case(3, 6, 24, seed=5)
    one = aligned_gradient(g, z, z_ref, mask, 0.3)
    two = aligned_gradient(np.concatenate([g, g]) / 2, np.concatenate([z, z]), np.concatenate([z_ref, z_ref]),
                           np.concatenate([mask, mask]), 0.3)
    assert two.loss == pytest.approx(one.loss, rel=1e-12)
    np.testing.assert_allclose(two.grad[:3], one.grad / 2, rtol=1e-5, atol=1e-12)

    pad = lambda x: np.concatenate([x, np.zeros((*x.shape[:1], 10, *x.shape[2:]), x.dtype)], 1)  # noqa: E731
    padded = aligned_gradient(pad(g), pad(z), pad(z_ref), pad(mask), 0.3)
    assert padded.loss == pytest.approx(one.loss, rel=1e-12)
    np.testing.assert_allclose(padded.grad[:, :6], one.grad, rtol=1e-5, atol=1e-12)
    assert not padded.grad[:, 6:].any()


def test_nothing_to_align_adds_nothing():
    z, z_ref, mask, g = _case(2, 5, 8)
    rounding = z * np.float32(1 + 2e-7)  # the same features to float32 precision
    for term in (aligned_gradient(g, z, z.copy(), mask, 0.1), aligned_gradient(g, z, rounding, mask, 0.1),
                 aligned_gradient(g * 0, z, z_ref, mask, 0.1), aligned_gradient(g, z, z_ref, mask, 0.0)):
        assert term.ratio == 0.0 and not term.grad.any()
    assert aligned_gradient(g, z, z_ref, mask, 0.1).ratio > 0


def test_the_head_trainer_applies_and_reports_the_normalized_term(tiny_bundles):
    """On a real ORT head: the first step (θ_k = φ) has nothing to align; once θ_k has moved, the
    applied term is λ·‖g‖ and the round's metrics say so (align_ratio, align_gap)."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.backends import open_backend
    from flexsfl.edge_runtime.data import Example
    from flexsfl.edge_runtime.trainer import HeadTrainer, RoundSettings

    bundle = load_bundle(tiny_bundles("gpt2", 1, "ort"))
    train = [Example(f"example number {i} says {'yes' if i % 2 else 'no'}", i % 2) for i in range(12)]
    t = HeadTrainer(bundle, open_backend("ort", bundle, threads=1), train)
    t.begin_round(RoundSettings(0, 3, 4, 0.5, "sgd", 0.2), t.backend.get_params())
    rng = np.random.default_rng(0)
    for _ in range(3):
        step = t.forward()
        t.backward(rng.standard_normal(step.z.shape).astype(np.float32) * 0.05, 1.0)
    m = t.stats.as_metrics()
    assert m["align_ratio"] == pytest.approx(0.2 * 2 / 3, rel=1e-6), m  # steps 2 and 3 align, step 1 cannot
    assert m["align_gap"] > 0 and m["align_loss"] > 0
