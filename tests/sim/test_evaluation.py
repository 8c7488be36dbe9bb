"""Evaluator: global and personal accuracy equal a hand computation on a tiny Llama.

The hand computation runs one example at a time (no padding) with the tensors written into the
model; the Evaluator batches with padding and swaps personal tensors in without touching the
live model. Known random weights everywhere make the three labels' predictions differ, and the
personal tensors change some predictions, so equal accuracies are not an accident.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.model.loading import load_model
from flexsfl.server_backend.tail_host import TailHost
from flexsfl.sim.evaluation import Evaluator

WORDS = "the a film story was good bad long short very not quite funny dull sharp warm cold plot actor ending".split()


@pytest.fixture(scope="module")
def setup(tiny_model_dirs):
    host = TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=3))
    rng = np.random.default_rng(0)
    host.load_state({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.state().items()})
    encoder = TextEncoder.from_file(tiny_model_dirs["llama"] / "tokenizer.json", max_seq=24, pad_id=0)
    examples = [Example(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))), int(rng.integers(0, 3)))
                for _ in range(21)]
    return host, encoder, examples


def _predict_by_hand(host, encoder, examples, params=None) -> np.ndarray:
    """argmax per example, each run alone, with ``params`` written into the model (then restored)."""
    saved = host.state()
    if params:
        host.load_state(params)
    try:
        preds = []
        with torch.no_grad():
            for e in examples:
                enc = encoder.encode([e.text])
                logits = host.loaded.model(input_ids=torch.from_numpy(enc.input_ids),
                                           attention_mask=torch.from_numpy(enc.attention_mask)).logits
                preds.append(int(logits.argmax(-1)))
        return np.array(preds)
    finally:
        host.load_state(saved)


def _acc(preds, examples) -> float:
    return int((preds == np.array([e.label for e in examples])).sum()) / len(examples)


def test_global_accuracy_is_the_hand_count(setup):
    host, encoder, examples = setup
    preds = _predict_by_hand(host, encoder, examples)
    assert len(set(preds.tolist())) > 1  # the model does not answer one class for everything
    ev = Evaluator(host, encoder, batch_size=8)  # 21 examples: batches of 8, 8, 5
    assert ev.accuracy(examples) == _acc(preds, examples)
    assert ev.accuracy(examples[:5]) == _acc(preds[:5], examples[:5])


@pytest.mark.parametrize("which", ["head", "whole"])
def test_personal_accuracy_swaps_the_tensors_in(setup, which):
    host, encoder, examples = setup
    rng = np.random.default_rng(1)
    before = host.state()
    # A FlexP-SFL client's personal head (blocks 0-1), or a FedAvg/local client's whole model.
    names = [n for n, j in host.blocks.items() if which == "whole" or j < 2]
    personal = {n: (3 * rng.standard_normal(before[n].shape)).astype(np.float32) for n in names}
    want = _predict_by_hand(host, encoder, examples, personal)
    assert (want != _predict_by_hand(host, encoder, examples)).any(), "the personal tensors change some predictions"
    ev = Evaluator(host, encoder, batch_size=8)
    assert ev.accuracy(examples, personal) == _acc(want, examples)
    after = host.state()  # the live model was not touched
    assert all(np.array_equal(after[n], before[n]) for n in before)
    assert ev.accuracy(examples) == _acc(_predict_by_hand(host, encoder, examples), examples)


def test_logits_come_back_in_the_examples_order_with_less_padding(setup):
    host, encoder, examples = setup
    ev = Evaluator(host, encoder, batch_size=8)
    got = ev.logits(examples)
    rows = []
    with torch.no_grad():  # each example alone, no padding at all
        for e in examples:
            enc = encoder.encode([e.text])
            rows.append(host.loaded.model(input_ids=torch.from_numpy(enc.input_ids),
                                          attention_mask=torch.from_numpy(enc.attention_mask)).logits.numpy())
    want = np.concatenate(rows)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # batches are by length: the padded tokens are fewer than batching in the given order
    lengths = [int(encoder.encode([e.text]).attention_mask.sum()) for e in examples]
    in_order = sum(max(lengths[i:i + 8]) * len(lengths[i:i + 8]) for i in range(0, len(lengths), 8))
    padded = sum(int(ids.numel()) for ids, *_ in ev._batches(examples))
    assert padded < in_order
