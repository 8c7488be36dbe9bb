"""The alignment term at the top's input, as the device composes it, equals eager autograd.

A tiny U-shaped model in PyTorch (head: linear; middle, the server's: linear + tanh; top: linear
on the mean over real tokens + cross-entropy). The split path does what the device and server
do, in their order: Z and Z' = head under θ and φ, H and H' = middle of each, dL/dH from the top
alone, ``G_H = dL/dH + aligned_gradient(dL/dH, H, H', mask, λ).grad`` (the function
:meth:`UTrainer.top_step` calls), dL/dZ = the middle's vector-Jacobian product with G_H, and the
head's ``G_Z = dL/dZ + aligned_gradient(dL/dZ, Z, Z', mask, λ).grad``. The reference runs the
whole model in one autograd pass with both terms as tensor hooks, the KL written independently
(``torch.nn.functional.kl_div``). Every parameter's gradient agrees (rel err <= 1e-4), the term
at H has norm λ‖dL/dH‖, and the top's own gradient does not see it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from flexsfl.edge_runtime.alignment import aligned_gradient

B, T, D, C = 3, 5, 6, 4


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def _setup(seed: int):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    x = r(B, T, D)
    mask = torch.ones(B, T, dtype=torch.int64)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    y = torch.tensor([1, 3, 0])
    phi_head, theta_head = r(D, D) * 0.5, None
    theta_head = phi_head + 0.3 * r(D, D)  # a personal head that drifted from φ
    middle, top = r(D, D) * 0.5, r(D, C)
    return x, mask, y, theta_head, phi_head, middle, top


def _head(x, w):
    return x @ w


def _middle(z, w):
    return torch.tanh(z @ w)


def _top_loss(h, mask, w, y):
    m = mask[..., None].to(h.dtype)
    pooled = (h * m).sum(1) / m.sum(1)
    return F.cross_entropy(pooled @ w, y)


def _kl_hook(x_ref, mask, lam):
    """g -> g + λ‖g‖·a/‖a‖, a = ∂/∂x mean_b mean_{real t} KL(softmax(x_ref) || softmax(x))."""
    m = mask.double()
    w = m / m.sum(1, keepdim=True) / m.shape[0]

    def hook(g, x):
        with torch.enable_grad():  # hooks run inside backward, where grad mode is off
            xd = x.detach().double().requires_grad_(True)
            kl = F.kl_div(torch.log_softmax(xd, -1), torch.log_softmax(x_ref.double(), -1), reduction="none", log_target=True)
            (a,) = torch.autograd.grad((kl.sum(-1) * w).sum(), xd)
        return g + (lam * g.double().norm() / a.norm() * a).to(g.dtype)

    return hook


def _split_path(x, mask, y, th, ph, mid, top, lam):
    """The device's and the server's computation, in their order, through numpy where the wire is."""
    msk = mask.numpy()
    th_, mid_, top_ = (t.clone().requires_grad_(True) for t in (th, mid, top))
    z_t = _head(x, th_)
    z = z_t.detach().numpy()
    with torch.no_grad():
        z_ref = _head(x, ph).numpy()  # Z' = head(x; φ), sent with Z
    z_in = torch.from_numpy(z).requires_grad_(True)  # the server's middle
    h_t = _middle(z_in, mid_)
    h = h_t.detach().numpy()
    with torch.no_grad():
        h_ref = _middle(torch.from_numpy(z_ref), mid_).numpy()  # H' = middle_φ(Z'), no grad
    h_in = torch.from_numpy(h).requires_grad_(True)  # the device's top
    loss = _top_loss(h_in, mask, top_, y)
    d_h, g_top = torch.autograd.grad(loss, [h_in, top_])
    d_h = d_h.numpy()
    term_h = aligned_gradient(d_h, h, h_ref, msk, lam)  # what UTrainer.top_step adds
    g_h = d_h + term_h.grad
    d_z, g_mid = torch.autograd.grad(h_t, [z_in, mid_], torch.from_numpy(g_h))  # the server's backward
    d_z = d_z.numpy()
    term_z = aligned_gradient(d_z, z, z_ref, msk, lam)  # the head's term, as without align_top
    (g_head,) = torch.autograd.grad(z_t, [th_], torch.from_numpy(d_z + term_z.grad))
    return {"head": g_head.numpy(), "middle": g_mid.numpy(), "top": g_top.numpy()}, term_h, d_h


def _eager(x, mask, y, th, ph, mid, top, lam):
    th_, mid_, top_ = (t.clone().requires_grad_(True) for t in (th, mid, top))
    with torch.no_grad():
        z_ref = _head(x, ph)
        h_ref = _middle(z_ref, mid)
    z = _head(x, th_)
    hz = _kl_hook(z_ref, mask, lam)
    z.register_hook(lambda g: hz(g, z))
    h = _middle(z, mid_)
    hh = _kl_hook(h_ref, mask, lam)
    h.register_hook(lambda g: hh(g, h))
    _top_loss(h, mask, top_, y).backward()
    return {"head": th_.grad.numpy(), "middle": mid_.grad.numpy(), "top": top_.grad.numpy()}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_device_g_h_equals_eager_autograd_with_the_term_at_h(seed, lam):
    args = _setup(seed)
    split, term, d_h = _split_path(*args, lam)
    eager = _eager(*args, lam)
    for k in ("head", "middle", "top"):
        assert _rel(split[k], eager[k]) <= 1e-4, (k, _rel(split[k], eager[k]))
    # the term is λ‖dL/dH‖ long, zero on padding, and changes what reaches the head
    assert term.ratio == pytest.approx(lam, rel=1e-6)
    assert np.linalg.norm(term.grad) == pytest.approx(lam * np.linalg.norm(d_h), rel=1e-5)
    assert not term.grad[0, 3:].any() and not term.grad[2, 1:].any()
    plain = _eager(*args, 0.0)
    assert _rel(split["head"], plain["head"]) > 1e-3
    np.testing.assert_allclose(split["top"], plain["top"], rtol=1e-6)  # the top trains on the task loss alone


def test_no_term_when_the_global_path_agrees():
    x, mask, y, _, ph, mid, top = _setup(0)
    split, term, _ = _split_path(x, mask, y, ph, ph, mid, top, 0.5)  # θ = φ: H = H'
    assert term.ratio == 0.0 and not term.grad.any()
    plain = _eager(x, mask, y, ph, ph, mid, top, 0.0)
    for k in split:
        assert _rel(split[k], plain[k]) <= 1e-5
