"""Accuracy of global and personal models, where the server (or a simulation) knows the test data.

A personal model is the global model with some trainable tensors replaced: a FlexP-SFL client's
head adapters θ_k (the tail stays global), or a FedAvg/local client's whole set of adapters and
task head. :func:`accuracy` runs the full model with those tensors swapped in (``functional_call``,
nothing is copied into the live model), on token batches made with the bundle's tokenizer.

For a causal LM, :meth:`Evaluator.perplexity` is the LM's measure (lower is better): ``exp`` of
the mean next-token negative log-likelihood over every predicted token of the texts (padding
predicts nothing and is never predicted; an instruction example's prompt is never predicted,
as in training), with the bytes of UTF-8 text per token beside it.
"""

from __future__ import annotations

from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch

from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.text import TextEncoder

from flexsfl.server_backend.tail_host import TailHost

__all__ = ["Evaluator", "LMScore", "label_prior_bias", "label_prior_accuracies"]


class LMScore(NamedTuple):
    """A causal LM on a set of texts: perplexity (lower is better), predicted tokens, UTF-8 bytes per token."""

    perplexity: float
    tokens: int
    bytes_per_token: float


class Evaluator:
    """Scores models of one :class:`TailHost` on fixed example sets (tokenized once)."""

    def __init__(self, host: TailHost, encoder: TextEncoder, *, batch_size: int = 64) -> None:
        self.host = host
        self.encoder = encoder
        self.batch_size = batch_size
        # canonical name -> the model's own parameter name (with PEFT's ".default" parts)
        names = {}
        for own, p in host.loaded.model.named_parameters():
            for canon, q in host.params.items():
                if q is p:
                    names[canon] = own
        self._own = names
        self._cache: dict[int, tuple[Sequence[Example], list]] = {}

    def _batches(self, examples: Sequence[Example]):
        key = id(examples)
        if key not in self._cache:
            out = []
            for i in range(0, len(examples), self.batch_size):
                chunk = examples[i : i + self.batch_size]
                enc = self.encoder.encode([e.text for e in chunk])
                out.append((torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask),
                            np.array([e.label for e in chunk]),
                            torch.from_numpy(self.encoder.lm_labels(enc, [e.prompt for e in chunk]))))
            self._cache[key] = (examples, out)  # holding `examples` keeps its id from being reused
        return self._cache[key][1]

    @torch.no_grad()
    def accuracy(self, examples: Sequence[Example], params: Mapping[str, np.ndarray] | None = None,
                 logit_bias: np.ndarray | None = None) -> float:
        """Accuracy of the global model, or of it with ``params`` (canonical names) swapped in;
        ``logit_bias`` [C] is added to every example's logits before the argmax."""
        model = self.host.loaded.model
        swap = {self._own[n]: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in (params or {}).items()}
        correct = total = 0
        for ids, mask, labels, _ in self._batches(examples):
            if swap:
                logits = torch.func.functional_call(model, swap, (), {"input_ids": ids, "attention_mask": mask}).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            scores = logits.numpy() + (0.0 if logit_bias is None else logit_bias)
            correct += int((scores.argmax(-1) == labels).sum())
            total += len(labels)
        return correct / max(total, 1)

    @torch.no_grad()
    def perplexity(self, examples: Sequence[Example], params: Mapping[str, np.ndarray] | None = None) -> LMScore:
        """Token-weighted perplexity of the causal LM (global, or with ``params`` swapped in) on ``examples``' texts.

        Position ``t`` predicts token ``t+1`` where both are real tokens; texts are cut at the
        encoder's ``max_seq`` as in training. Raises ``ValueError`` for a classification model.
        """
        if self.host.info.task != "causal_lm":
            raise ValueError(f"perplexity needs a causal LM; {self.host.info.id} is a {self.host.info.task} model")
        model = self.host.loaded.model
        swap = {self._own[n]: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in (params or {}).items()}
        nll, tokens = 0.0, 0
        for ids, mask, _, lm_labels in self._batches(examples):
            kw = {"input_ids": ids, "attention_mask": mask}
            logits = (torch.func.functional_call(model, swap, (), kw) if swap else model(**kw)).logits
            labels = lm_labels[:, 1:]  # padding and instruction prompts are never predicted
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           labels.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
        text_bytes = sum(len(e.text.encode("utf-8")) for e in examples)
        n_tok = sum(int(m.sum()) for _, m, _, _ in self._batches(examples))
        return LMScore(float(np.exp(nll / max(tokens, 1))), tokens, text_bytes / max(n_tok, 1))


def label_prior_bias(own: np.ndarray, overall: np.ndarray) -> np.ndarray:
    """``log π_k − log π`` [C]: the logit shift that turns a model of the overall label mix ``π``
    into one of a client's mix ``π_k`` (Bayes' rule under label shift: ``p_k(y|x) ∝ p(y|x)·π_k(y)/π(y)``).

    ``own``, ``overall``: label counts [C] (the client's training labels, everyone's); add-one
    smoothing keeps an unseen class possible.
    """
    own, overall = np.asarray(own, np.float64) + 1.0, np.asarray(overall, np.float64) + 1.0
    return np.log(own / own.sum()) - np.log(overall / overall.sum())


def label_prior_accuracies(ev: Evaluator, clients: Sequence, num_labels: int) -> dict[str, float]:
    """The floor any personalization must beat: per client (``ClientSplit``: ``client``, ``train``,
    ``test``), the *global* model with the client's training label prior (:func:`label_prior_bias`)
    on the client's own test split. Ten numbers per client, no training."""
    counts = {c.client: np.bincount([e.label for e in c.train], minlength=num_labels)[:num_labels] for c in clients}
    overall = sum(counts.values())
    return {f"c{c.client}": ev.accuracy(c.test, logit_bias=label_prior_bias(counts[c.client], overall)) for c in clients}
