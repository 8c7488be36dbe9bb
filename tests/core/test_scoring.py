"""The one scorer the devices and the server share: a causal LM's next-token hits, counted tokens and
summed NLL against torch's cross-entropy; a classifier's argmax hits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from flexsfl.core.scoring import cls_score, lm_score, lm_summary, perplexity, summed


def test_lm_summary_is_torch_cross_entropy_over_the_counted_next_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (3, 7, 50)).astype(np.float32)
    labels = rng.integers(0, 50, (3, 7))
    labels[0, 5:] = -100  # padding
    labels[2, :3] = -100  # an instruction's prompt
    rows = lm_summary(logits, labels)
    for i in range(3):
        lg, lab = torch.from_numpy(logits[i, :-1]).double(), torch.from_numpy(labels[i, 1:])
        keep = lab != -100
        want = torch.nn.functional.cross_entropy(lg[keep], lab[keep], reduction="sum").item()
        assert rows[i, 0] == pytest.approx(want, rel=1e-6)
        assert rows[i, 1] == keep.sum().item()
        assert rows[i, 2] == (lg.argmax(-1) == lab)[keep].sum().item()
    s = lm_score(logits, labels)
    assert s == summed(rows) and s.counted == int(rows[:, 1].sum())
    assert perplexity(s.nll, s.counted) == pytest.approx(math.exp(rows[:, 0].sum() / rows[:, 1].sum()))
    assert perplexity(0.0, 0) is None
    assert not lm_summary(logits, None).any()  # no labels sent (a U-shaped eval step): nothing scored


def test_cls_score_counts_argmax_hits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
    assert cls_score(logits, np.array([1, 1, 1])) == (2, 3, 0.0)
