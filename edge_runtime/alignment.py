"""The alignment term of FlexP-SFL, computed on the device in numpy.

``L_align = mean over real tokens of KL(softmax(Z') || softmax(Z))``, softmax over the hidden
dimension, where ``Z = head(x; θ_k)`` is the personal head's smashed data and ``Z' = head(x; φ)``
the global head's (forward only). Its gradient with respect to ``Z`` is added to the server's
``g`` before the head's backward: ``G = g + λ ∂L_align/∂Z``.

For one token, ``∂KL(p'||p)/∂z = p - p'`` with ``p = softmax(z)`` (the ``log p'`` term does not
depend on ``z`` and ``Σ p' = 1``); the masked mean divides by the number of real tokens.
"""

from __future__ import annotations

import numpy as np

__all__ = ["softmax", "alignment_loss_and_grad"]


def softmax(z: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in float64 for a stable difference of near-equal vectors."""
    z = z.astype(np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def alignment_loss_and_grad(z: np.ndarray, z_ref: np.ndarray, attention_mask: np.ndarray) -> tuple[float, np.ndarray]:
    """``(L_align, ∂L_align/∂z)`` for ``z``, ``z_ref`` [B, T, d] and a [B, T] 0/1 mask.

    The gradient is float32 [B, T, d] and zero on padding tokens.
    """
    m = attention_mask.astype(np.float64)[..., None]
    n = max(float(m.sum()), 1.0)
    p, q = softmax(z), softmax(z_ref)
    kl = (q * (np.log(np.clip(q, 1e-300, None)) - np.log(np.clip(p, 1e-300, None)))).sum(-1, keepdims=True)
    loss = float((kl * m).sum() / n)
    return loss, ((p - q) * m / n).astype(np.float32)
