"""Evaluator.perplexity: exp of the mean next-token NLL over real tokens, batched with padding,
equals a per-text hand computation with Hugging Face's own loss; personal tensors change it."""

from __future__ import annotations

import math

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
    host = TailHost(load_model(str(tiny_model_dirs["llama"]), task="causal_lm"))
    encoder = TextEncoder.from_file(tiny_model_dirs["llama"] / "tokenizer.json", max_seq=24, pad_id=0)
    rng = np.random.default_rng(0)
    texts = [Example(" ".join(rng.choice(WORDS, size=int(rng.integers(2, 14)))), 0) for _ in range(9)]
    return host, encoder, texts


def test_perplexity_equals_per_text_hf_loss(setup):
    host, encoder, texts = setup
    ev = Evaluator(host, encoder, batch_size=4)  # batches of different lengths: padding inside
    score = ev.perplexity(texts)
    nll = n = 0
    with torch.no_grad():
        for e in texts:
            enc = encoder.encode([e.text])
            ids = torch.from_numpy(enc.input_ids)
            assert enc.attention_mask.all()  # alone: no padding
            loss = host.loaded.model(input_ids=ids, labels=ids).loss  # HF shifts and averages
            nll += float(loss) * (ids.shape[1] - 1)
            n += ids.shape[1] - 1
    assert score.tokens == n
    assert math.isclose(score.perplexity, math.exp(nll / n), rel_tol=1e-5)
    total_bytes = sum(len(e.text.encode()) for e in texts)
    assert math.isclose(score.bytes_per_token, total_bytes / (n + len(texts)), rel_tol=1e-9)


def test_personal_tensors_change_perplexity_without_touching_the_global_model(setup):
    host, encoder, texts = setup
    ev = Evaluator(host, encoder)
    before = ev.perplexity(texts).perplexity
    rng = np.random.default_rng(1)
    personal = {n: rng.standard_normal(a.shape).astype(np.float32) for n, a in host.state().items() if ".layers.0." in n}
    assert personal
    assert abs(ev.perplexity(texts, personal).perplexity - before) > 1e-3 * before
    assert ev.perplexity(texts).perplexity == before


def test_perplexity_refuses_a_classifier(tiny_model_dirs, setup):
    _, encoder, texts = setup
    ev = Evaluator(TailHost(load_model(str(tiny_model_dirs["llama"]), num_labels=2)), encoder)
    with pytest.raises(ValueError, match="causal LM"):
        ev.perplexity(texts)


def test_full_model_trainer_scores_next_tokens_for_a_causal_lm(tiny_model_dirs, tmp_path, setup):
    """The local-only / FedAvg baselines' device evaluation: next-token hits over real tokens."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.export.pipeline import ExportConfig, export_bundle
    from flexsfl.sim.full_trainer import FullModelTrainer

    _, _, texts = setup
    export_bundle(ExportConfig(model=str(tiny_model_dirs["llama"]), split=1, out=str(tmp_path / "b"), backend="ort",
                               task="causal_lm", max_batch=8, max_seq=24, ort_training_artifacts=False), progress=False)
    t = FullModelTrainer(load_bundle(tmp_path / "b"), texts, texts, threads=1)
    correct, total, nll = t.evaluate()
    hits = n = 0
    ref_nll = 0.0
    with torch.no_grad():
        for e in texts:
            enc = t.encoder.encode([e.text])
            ids = torch.from_numpy(enc.input_ids)
            logits = t.loaded.model(input_ids=ids).logits[0, :-1]
            hits += int((logits.argmax(-1) == ids[0, 1:]).sum())
            ref_nll += float(torch.nn.functional.cross_entropy(logits.double(), ids[0, 1:], reduction="sum"))
            n += ids.shape[1] - 1
    assert (correct, total) == (hits, n) and n > len(texts)
    assert nll == pytest.approx(ref_nll, rel=1e-5)  # the device's own-text perplexity, exp(nll / total), is HF's


def test_instruction_examples_are_scored_on_the_response_only(setup):
    """An instruction example's prompt is never predicted: its perplexity is HF's loss with the
    prompt's label positions at -100 (as the devices train), over the response's tokens only."""
    host, encoder, _ = setup
    pairs = [("the film was", "very good"), ("a story not quite", "funny and warm"), ("plot", "dull long ending")]
    examples = [Example(f"{p} : {r}", 0, f"{p} :") for p, r in pairs]
    score = Evaluator(host, encoder, batch_size=2).perplexity(examples)
    nll = n = 0
    with torch.no_grad():
        for e in examples:
            ids = torch.from_numpy(encoder.encode([e.text]).input_ids)
            labels = torch.from_numpy(encoder.lm_labels(encoder.encode([e.text]), [e.prompt]))
            n_prompt = int((labels == -100).sum())
            assert n_prompt >= len(e.prompt.split())  # every prompt word is masked
            loss = host.loaded.model(input_ids=ids, labels=labels).loss
            nll += float(loss) * (ids.shape[1] - n_prompt)
            n += ids.shape[1] - n_prompt
    assert score.tokens == n
    assert math.isclose(score.perplexity, math.exp(nll / n), rel_tol=1e-5)


def test_whole_model_devices_train_and_score_instruction_examples_on_the_response_only(tiny_model_dirs, tmp_path, setup):
    """FedAvg / local-only devices: an instruction example's prompt carries no loss in training and is not
    scored, as on a split device and in the server's scoring (they once predicted the prompt too)."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.edge_runtime.trainer import BatchCursor, RoundSettings
    from flexsfl.export.pipeline import ExportConfig, export_bundle
    from flexsfl.sim.full_trainer import FullModelTrainer

    pairs = [("the film was", "very good"), ("a story not quite", "funny and warm"), ("plot", "dull long ending")]
    examples = [Example(f"{p} : {r}", 0, f"{p} :") for p, r in pairs]
    export_bundle(ExportConfig(model=str(tiny_model_dirs["llama"]), split=1, out=str(tmp_path / "b"), backend="ort",
                               task="causal_lm", max_batch=8, max_seq=24, ort_training_artifacts=False), progress=False)
    t = FullModelTrainer(load_bundle(tmp_path / "b"), examples, examples, seed=5, threads=1)

    def hf_loss(batch):  # HF's own mean loss over the response tokens of ``batch``, and how many
        enc = t.encoder.encode([e.text for e in batch])
        labels = torch.from_numpy(t.encoder.lm_labels(enc, [e.prompt for e in batch]))
        with torch.no_grad():
            out = t.loaded.model(input_ids=torch.from_numpy(enc.input_ids), attention_mask=torch.from_numpy(enc.attention_mask),
                                 labels=labels)
        return float(out.loss), int((labels[:, 1:] != -100).sum())

    _, total, nll = t.evaluate()
    per = [hf_loss([e]) for e in examples]
    assert total == sum(n for _, n in per) and total < sum(len(e.text.split()) for e in examples)
    assert nll == pytest.approx(sum(loss * n for loss, n in per), rel=1e-5)

    expected, _ = hf_loss(BatchCursor(examples, 5).next(len(examples)))  # the round's one batch, before its step
    t.begin_round(RoundSettings(round_id=0, local_steps=1, batch_size=len(examples), lr=1e-3, optimizer="sgd",
                                align_lambda=0.0, personal=True), None)
    t.train_local()
    assert t.stats.loss_sum == pytest.approx(expected, rel=1e-5)
