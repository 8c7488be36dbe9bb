"""One way to score a batch of predictions, wherever it is scored: on the device, on the server.

A classifier is scored by argmax hits. A causal LM by its next-token predictions over the tokens
that count (labels not ``-100``): hits, the tokens counted, and the summed negative log-likelihood
(nats), from which a device reports its perplexity on its own held-out text every round
(``exp(nll / counted)``, token-weighted like the server's :meth:`Evaluator.perplexity`).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

__all__ = ["Score", "lm_summary", "lm_score", "summed", "cls_score", "perplexity"]


class Score(NamedTuple):
    """What one evaluation batch (or a sum of them) scored."""

    correct: int
    counted: int
    nll: float = 0.0  # causal LM: summed negative log-likelihood of the counted tokens (nats); 0 for a classifier


def lm_summary(logits: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """[B, T, V] logits + [B, T] labels -> float32 [B, 3]: per sequence the summed NLL of its next tokens,
    the tokens counted and the tokens predicted right (position t predicts label t + 1; -100 is not counted).
    One sequence at a time in float64, so a 49,152-word vocabulary never needs a [B, T, V] float64 copy."""
    b = logits.shape[0]
    out = np.zeros((b, 3), np.float32)
    if labels is None:
        return out
    for i in range(b):
        lg, lab = logits[i, :-1].astype(np.float64), labels[i, 1:]
        keep = lab != -100
        m = lg.max(-1, keepdims=True)
        logz = m[:, 0] + np.log(np.exp(lg - m).sum(-1))
        picked = np.take_along_axis(lg, np.where(keep, lab, 0)[:, None], -1)[:, 0]
        out[i] = (np.where(keep, logz - picked, 0).sum(), keep.sum(), (keep & (lg.argmax(-1) == lab)).sum())
    return out


def lm_score(logits: np.ndarray, labels: np.ndarray) -> Score:
    """A causal LM's batch: next-token hits, tokens counted, summed NLL."""
    return summed(lm_summary(logits, labels))


def summed(summary: np.ndarray) -> Score:
    """The :class:`Score` of :func:`lm_summary`'s [B, 3] rows (what the server answers an LM's eval step with)."""
    s = np.asarray(summary, np.float64)
    return Score(int(round(s[:, 2].sum())), int(round(s[:, 1].sum())), float(s[:, 0].sum()))


def cls_score(logits: np.ndarray, labels: np.ndarray) -> Score:
    """A classifier's batch: argmax hits over the examples."""
    return Score(int((np.asarray(logits).argmax(-1) == labels).sum()), int(labels.shape[0]))


def perplexity(nll: float, counted: int) -> float | None:
    """exp(mean NLL per counted token); None when nothing was counted."""
    return math.exp(nll / counted) if counted else None
