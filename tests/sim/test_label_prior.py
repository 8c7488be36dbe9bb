"""The floor "global model + client label prior": the logit shift against a numpy reference, and the
Evaluator's prior-adjusted accuracy against a hand count on a tiny Llama."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.model.loading import load_model
from flexsfl.server_backend.tail_host import TailHost
from flexsfl.sim.data.partition import ClientSplit
from flexsfl.sim.evaluation import Evaluator, label_prior_accuracies, label_prior_bias

WORDS = "the a film story was good bad long short very not quite funny dull sharp warm cold plot actor ending".split()


def test_bias_is_log_ratio_of_smoothed_priors():
    own, overall = np.array([8, 0, 2]), np.array([20, 30, 10])
    want = np.log(np.array([9, 1, 3]) / 13) - np.log(np.array([21, 31, 11]) / 63)
    np.testing.assert_allclose(label_prior_bias(own, overall), want, rtol=1e-12)
    # a client with the overall mix needs no shift
    np.testing.assert_allclose(label_prior_bias(overall, overall), 0.0, atol=1e-12)


def test_prior_adjusted_accuracy_is_the_hand_count(tiny_model_dirs):
    host = TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=3))
    rng = np.random.default_rng(1)
    host.load_state({n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.state().items()})
    encoder = TextEncoder.from_file(tiny_model_dirs["llama"] / "tokenizer.json", max_seq=24, pad_id=0)
    ex = lambda y: Example(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 12)))), y)  # noqa: E731
    test = lambda: tuple(ex(int(rng.integers(0, 3))) for _ in range(15))  # noqa: E731
    clients = (ClientSplit(0, tuple(ex(0) for _ in range(9)) + (ex(1),), test(), ()),  # train labels 9×0, 1×1
               ClientSplit(1, tuple(ex(2) for _ in range(6)) + (ex(1), ex(1)), test(), ()))  # 2×1, 6×2
    got = label_prior_accuracies(Evaluator(host, encoder), clients, 3)

    overall = np.array([9, 3, 6])
    for c, own in zip(clients, (np.array([9, 1, 0]), np.array([0, 2, 6]))):
        bias = label_prior_bias(own, overall)
        hits = 0
        with torch.no_grad():
            for e in c.test:  # one at a time, no padding
                enc = encoder.encode([e.text])
                logits = host.loaded.model(input_ids=torch.from_numpy(enc.input_ids),
                                           attention_mask=torch.from_numpy(enc.attention_mask)).logits[0].numpy()
                hits += int(np.argmax(logits + bias) == e.label)
        assert got[f"c{c.client}"] == pytest.approx(hits / len(c.test), abs=1e-12)
    # the prior moves predictions: without it the accuracies differ for at least one client
    plain = {f"c{c.client}": Evaluator(host, encoder).accuracy(c.test) for c in clients}
    assert plain != got
