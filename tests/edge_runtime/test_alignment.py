"""The alignment gradient equals torch autograd of the masked-mean KL."""

import numpy as np
import torch

from flexsfl.edge_runtime.alignment import alignment_loss_and_grad


def test_alignment_gradient_matches_torch_autograd():
    rng = np.random.default_rng(0)
    z = rng.standard_normal((3, 7, 16)).astype(np.float32) * 2
    z_ref = z + rng.standard_normal(z.shape).astype(np.float32) * 0.5
    mask = np.ones((3, 7), np.int64)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    loss, grad = alignment_loss_and_grad(z, z_ref, mask)

    zt = torch.tensor(z, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.tensor(z_ref, dtype=torch.float64), -1)
    kl = torch.nn.functional.kl_div(torch.log_softmax(zt, -1), q, reduction="none").sum(-1)  # KL(q || p)
    m = torch.tensor(mask, dtype=torch.float64)
    want = (kl * m).sum() / m.sum()
    want.backward()
    assert abs(loss - want.item()) <= 1e-9 * max(1.0, abs(want.item()))
    np.testing.assert_allclose(grad, zt.grad.numpy(), rtol=1e-5, atol=1e-9)
    assert not grad[1, 4:].any() and not grad[2, 2:].any()


def test_alignment_is_zero_when_heads_agree():
    z = np.random.default_rng(1).standard_normal((2, 5, 8)).astype(np.float32)
    loss, grad = alignment_loss_and_grad(z, z.copy(), np.ones((2, 5), np.int64))
    assert abs(loss) < 1e-12 and np.abs(grad).max() < 1e-9
