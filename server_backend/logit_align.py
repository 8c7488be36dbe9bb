"""The server's half of logit-level alignment (``logit_kl`` rounds): the KL of the global tail's
logits for Z' against those for Z, per request, for :meth:`~.tail_host.TailHost.train_batch`.

:func:`sequence_kl` is the device's :func:`flexsfl.edge_runtime.alignment.sequence_kl` in torch
(differentiable in the logits); :class:`AlignedStep` holds one request's task loss, its KL and the
gap ``‖ℓ - ℓ'‖/‖ℓ'‖`` while the tail host takes the gradients. The scaling of the term is
:func:`flexsfl.core.alignment.scale_term`, the device's rule. Why the term is computed here and
not on the device: the logits exist only on the server in the head/tail topology.
"""

from __future__ import annotations

import torch

from flexsfl.core.alignment import FP32_GAP

__all__ = ["AlignedStep", "sequence_kl"]


class AlignedStep:
    """One request inside :meth:`~.tail_host.TailHost._gradients`: its Z leaf and rows, its task loss and,
    when it aligns at the logits, its KL (with grad), the KL's value and the logits' gap."""

    def __init__(self, i: int, z: torch.Tensor, rows: slice, t: int, loss: torch.Tensor) -> None:
        self.i, self.z, self.rows, self.t, self.loss = i, z, rows, t, loss
        self.kl: torch.Tensor | None = None  # None: no term (not asked, or ℓ = ℓ' to float32 rounding)
        self.align_loss = self.gap = 0.0

    def align(self, logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
        """Set the KL of ``ref`` (ℓ') against ``logits`` (ℓ) for this request's rows; [B, C], or [B, T, V] with ``mask``."""
        m = None
        if logits.dim() == 3:  # causal LM: this request's own T, real tokens only
            logits, ref, m = logits[:, :self.t], ref[:, :self.t], mask[:, :self.t]
        kl = sequence_kl(logits, ref, m)
        self.align_loss = kl.item()
        with torch.no_grad():
            w = 1.0 if m is None else m[..., None].to(ref.dtype)
            diff, base = ((logits - ref) * w).double(), (ref * w).double()
            self.gap = float(torch.linalg.vector_norm(diff) / torch.linalg.vector_norm(base).clamp_min(1e-300))
        if self.gap >= FP32_GAP:
            self.kl = kl


def sequence_kl(logits: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``mean_b [(1/n_b) Σ_t m_bt KL(softmax(ref_bt) || softmax(logits_bt))]`` in float64, differentiable
    in ``logits``: [B, C] (``mask=None``) or [B, T, V] with a [B, T] 0/1 mask (the device's
    :func:`flexsfl.edge_runtime.alignment.sequence_kl`, in torch)."""
    lp, lq = torch.log_softmax(logits.double(), -1), torch.log_softmax(ref.double(), -1)
    kl = (lq.exp() * (lq - lp)).sum(-1)
    if mask is None:
        return kl.mean()
    m = mask.double()
    w = m / m.sum(1, keepdim=True).clamp_min(1.0) / max(kl.shape[0], 1)
    return (kl * w).sum()
