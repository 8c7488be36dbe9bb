"""The alignment term's variants and its normalization: one rule for the device and the server.

FlexP-SFL pulls a client's personal path towards the global one with the gradient ``a`` of a
per-sequence mean ``KL(softmax(X') || softmax(X))`` (``X'`` from the global adapters φ, ``X``
from the personal θ_k), added to the task gradient ``g`` at the head's output ``Z`` as
``λ·‖g‖·a/‖a‖``: λ is the fraction of the task gradient's norm spent on the pull, the same at
any batch, sequence length and width (issue 18). Two places compute it (:data:`ALIGNMENTS`):

- ``feature_kl``: ``X`` = the smashed data ``Z`` (softmax over the hidden units), on the device
  in numpy (:mod:`flexsfl.edge_runtime.alignment`); the device adds the term to the server's ``g``;
- ``logit_kl``: ``X`` = the model's logits ``ℓ = tail(Z)`` (softmax over classes or the
  vocabulary), on the server in torch (:mod:`flexsfl.server_backend.tail_host`): the device sends
  ``Z' = head(x; φ)`` with ``Z``, the server backpropagates the KL of ``tail(Z)`` against
  ``tail(Z')`` through the tail to ``Z`` and returns ``g + λ‖g‖·a/‖a‖``.

Both scale with :func:`scale_term`, so λ means the same in both. ``logit_kl`` is for head/tail
clients only: a U-shaped device's logits come out of its own top, whose exported program fuses a
hard-label cross-entropy (labels in, loss and gradients out); a logit-level term there would need
a top program that also takes soft targets, and the global model's logits for the batch, which
the device does not have. numpy only (core is torch-free).
"""

from __future__ import annotations

import numpy as np

from flexsfl.core.errors import ConfigError

__all__ = ["ALIGNMENTS", "FP32_GAP", "scale_term", "check_alignment"]

ALIGNMENTS = ("feature_kl", "logit_kl")  # KL between softmaxes of the head's features Z, or of the model's logits
# Relative differences ‖X - X'‖/‖X'‖ below this are float32 rounding, not a personal model that
# drifted: the KL gradient is then rounding noise, which the normalization would blow up to λ‖g‖.
FP32_GAP = 1e-6


def check_alignment(name: str, where: str = "alignment") -> str:
    """``name`` as one of :data:`ALIGNMENTS` (the CLI's ``feature-kl`` spelling accepted), or a one-line ConfigError naming ``where``."""
    norm = name.replace("-", "_") if isinstance(name, str) else name
    if norm not in ALIGNMENTS:
        raise ConfigError(f"{where} must be feature-kl or logit-kl, got {name!r}")
    return norm


def scale_term(g: np.ndarray, a: np.ndarray, lam: float, gap: float, *, norm_a: float | None = None) -> tuple[np.ndarray, float]:
    """``(λ·‖g‖·a/‖a‖ as float32, its norm / ‖g‖)``; zeros and ratio 0 when λ <= 0, ``g = 0``,
    ``a = 0`` or ``gap < FP32_GAP`` (nothing to align). Norms in float64 over the whole array
    (one client's batch); ``norm_a``: ‖a‖ if already known (the device computes it while it waits)."""
    ng = float(np.linalg.norm(g.astype(np.float64)))
    a64 = a.astype(np.float64, copy=False)
    na = float(np.linalg.norm(a64)) if norm_a is None else norm_a
    if lam <= 0 or gap < FP32_GAP or na <= 1e-300 or ng == 0.0:
        return np.zeros(g.shape, np.float32), 0.0
    term = (lam * ng / na) * a64
    return term.astype(np.float32), float(np.linalg.norm(term)) / ng
