"""The alignment term of FlexP-SFL, computed on the device in numpy.

``L_align = mean over real tokens of KL(softmax(Z') || softmax(Z))``, softmax over the hidden
dimension, where ``Z = head(x; θ_k)`` is the personal head's smashed data and ``Z' = head(x; φ)``
the global head's (forward only). Its gradient with respect to ``Z`` is added to the server's
``g`` before the head's backward: ``G = g + λ ∂L_align/∂Z``.

For one token, ``∂KL(p'||p)/∂z = p - p'`` with ``p = softmax(z)`` (the ``log p'`` term does not
depend on ``z`` and ``Σ p' = 1``); the masked mean divides by the number of real tokens.

**What the device applies** is :func:`aligned_gradient`, the term normalized so that λ means the
same at any batch size, sequence length and width (issue 18): ``G = g + λ·‖g‖·a/‖a‖`` with
``a = ∇_z`` of the per-sequence mean KL. λ is then *the fraction of the task gradient's norm
spent pulling the personal features towards the global ones* (λ = 0.1: a pull one tenth the
size of the task gradient). Why relative to ‖g‖ and not a per-sequence mean alone: a mean only
fixes the 1/(B·T) of the token average; the raw term's size still depends on the width (a
softmax over d units makes ``p - p'`` shrink like 1/√d) and on how large the tail's ``g`` happens
to be, which no fixed λ can follow. Measured before this change: ‖λ∇KL‖/‖g‖ ≈ 0.3% at λ = 0.1.
The price: the pushed vector is not the gradient of a fixed loss (its size follows ``g``), and
when the heads agree exactly (``a = 0``, the first step from ``θ_k = φ``) there is nothing to add.
:func:`alignment_loss_and_grad` (the raw token-mean term) is kept for reference and comparison.

Two variants, :data:`ALIGNMENTS` (:mod:`flexsfl.core.alignment`, which also holds the scaling
rule both use): ``feature_kl`` on the smashed data ``Z``/``Z'`` ([B, T, d]), here on the device,
and ``logit_kl`` on the model's logits ``tail(Z)``/``tail(Z')``, which a head/tail device does not
have: in a ``logit_kl`` round it sends ``Z'`` with ``Z`` and the server returns ``g`` with the
term already in it (the device then adds nothing). :func:`sequence_kl` also takes [B, C] logits
(``mask=None``), for a holder of the task head (the U-shaped top's input uses it on ``H``).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from flexsfl.core.alignment import ALIGNMENTS, scale_term

__all__ = ["ALIGNMENTS", "AlignTerm", "AlignReference", "softmax", "alignment_loss_and_grad", "sequence_kl", "align_reference",
           "apply_alignment", "aligned_gradient"]



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


@dataclasses.dataclass(frozen=True)
class AlignTerm:
    """One step's alignment, as applied: ``G = g + grad``."""

    loss: float  # the per-sequence mean KL (see :func:`sequence_kl`)
    grad: np.ndarray  # float32, shape of g: λ·‖g‖·a/‖a‖ (zero on padding)
    ratio: float  # ‖grad‖ / ‖g‖: λ, or 0 when there is nothing to align (or no task gradient)
    gap: float  # ‖z - z_ref‖ / ‖z_ref‖ over real positions: how far the personal output is from the global one


def sequence_kl(z: np.ndarray, z_ref: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, np.ndarray]:
    """``(L, ∂L/∂z)`` for ``L = mean_b [ (1/n_b) Σ_t m_bt KL(softmax(z_ref_bt) || softmax(z_bt)) ]``.

    ``z``, ``z_ref``: [B, T, d] with a [B, T] 0/1 ``mask`` (a sequence with no real token counts
    zero), or [B, C] with ``mask=None`` (one position per sequence). Unlike the token mean of
    :func:`alignment_loss_and_grad`, every sequence weighs the same whatever its length, so ``L``
    does not change when a batch is repeated or its sequences are padded. The gradient is float64.
    """
    z3, r3 = (z[:, None], z_ref[:, None]) if z.ndim == 2 else (z, z_ref)
    m = np.ones(z3.shape[:2]) if mask is None else mask.astype(np.float64)
    if m.shape != z3.shape[:2] or z3.shape != r3.shape:
        raise ValueError(f"shapes disagree: z {list(z.shape)}, z_ref {list(z_ref.shape)}, mask {list(m.shape)}")
    w = m / np.maximum(m.sum(1, keepdims=True), 1.0) / max(z3.shape[0], 1)  # [B, T] weight of each position
    p, q = softmax(z3), softmax(r3)
    kl = (q * (np.log(np.clip(q, 1e-300, None)) - np.log(np.clip(p, 1e-300, None)))).sum(-1)
    grad = (p - q) * w[..., None]
    return float((kl * w).sum()), grad.reshape(z.shape)


@dataclasses.dataclass(frozen=True)
class AlignReference:
    """Everything of one step's alignment term that does not need ``g``: computed while the
    device waits for the server (:func:`align_reference`), applied when ``g`` arrives
    (:func:`apply_alignment`)."""

    loss: float  # the per-sequence mean KL
    a: np.ndarray  # float64 ∂L/∂z of sequence_kl
    norm_a: float  # ‖a‖
    gap: float  # ‖z - z_ref‖ / ‖z_ref‖ over real positions


def align_reference(z: np.ndarray, z_ref: np.ndarray, mask: np.ndarray | None) -> AlignReference:
    """The ``g``-independent part of :func:`aligned_gradient`, for ``z``, ``z_ref`` and ``mask``."""
    loss, a = sequence_kl(z, z_ref, mask)
    m = 1.0 if mask is None else mask.astype(np.float64)[..., None]
    diff, ref = (z.astype(np.float64) - z_ref) * m, z_ref.astype(np.float64) * m
    gap = float(np.linalg.norm(diff) / max(float(np.linalg.norm(ref)), 1e-300))
    return AlignReference(loss, a, float(np.linalg.norm(a)), gap)


def apply_alignment(g: np.ndarray, ref: AlignReference, lam: float) -> AlignTerm:
    """The term to add to ``g`` from a prepared :class:`AlignReference`: ``λ·‖g‖·a/‖a‖`` (see
    :func:`aligned_gradient`, which is this after :func:`align_reference`: the same numbers)."""
    grad, ratio = scale_term(g, ref.a, lam, ref.gap, norm_a=ref.norm_a)
    return AlignTerm(ref.loss, grad, ratio, ref.gap)


def aligned_gradient(g: np.ndarray, z: np.ndarray, z_ref: np.ndarray, mask: np.ndarray | None,
                     lam: float) -> AlignTerm:
    """The alignment term to add to the task gradient ``g`` (same shape as ``z``): ``λ·‖g‖·a/‖a‖``.

    ``a = ∂L/∂z`` of :func:`sequence_kl`; norms are over the whole batch. Invariant by
    construction: ``‖grad‖/‖g‖ = λ`` at any B, T and width, so a λ tuned on one model or batch
    size means the same on another. Zero when ``λ = 0``, ``g = 0``, or the outputs agree to float32
    rounding (``gap`` under 1e-6: ``a`` would be rounding noise, which the normalization would blow up).
    """
    return apply_alignment(g, align_reference(z, z_ref, mask), lam)
