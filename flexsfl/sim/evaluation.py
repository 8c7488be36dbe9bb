"""Accuracy of global and personal models, where the server (or a simulation) knows the test data.

A personal model is the global model with some trainable tensors replaced: a FlexP-SFL client's
head adapters θ_k (the tail stays global), or a FedAvg/local client's whole set of adapters and
task head. :func:`accuracy` runs the full model with those tensors swapped in (``functional_call``,
nothing is copied into the live model), on token batches made with the bundle's tokenizer. The
batches hold examples of similar length (sorted by token count, each padded to its longest), so
little of the work is padding; :meth:`Evaluator.logits` returns rows in the examples' own order.

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

__all__ = ["Evaluator", "LMScore", "accuracy_of", "label_prior_bias", "label_prior_accuracies"]


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
        """Token batches of ``examples`` by increasing length, and each batch's positions in ``examples``."""
        key = id(examples)
        if key not in self._cache:
            texts = [e.text for e in examples]
            # One pass for the lengths; a stable sort keeps equal lengths in their order.
            lengths = self.encoder.encode(texts).attention_mask.sum(axis=1) if texts else np.zeros(0, np.int64)
            order = np.argsort(lengths, kind="stable")
            out = []
            for i in range(0, len(examples), self.batch_size):
                at = order[i : i + self.batch_size]
                chunk = [examples[j] for j in at]
                enc = self.encoder.encode([e.text for e in chunk])
                out.append((torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask),
                            np.array([e.label for e in chunk]),
                            torch.from_numpy(self.encoder.lm_labels(enc, [e.prompt for e in chunk])), at))
            self._cache[key] = (examples, out)  # holding `examples` keeps its id from being reused
        return self._cache[key][1]

    @torch.no_grad()
    def logits(self, examples: Sequence[Example], params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits [N, C] of the global model, or of it with ``params`` (canonical names) swapped in,
        one row per example in the order of ``examples``."""
        model = self.host.loaded.model
        swap = {self._own[n]: torch.from_numpy(np.array(a, dtype=np.float32)) for n, a in (params or {}).items()}
        rows: np.ndarray | None = None
        for ids, mask, _, _, at in self._batches(examples):
            if swap:
                logits = torch.func.functional_call(model, swap, (), {"input_ids": ids, "attention_mask": mask}).logits
            else:
                logits = model(input_ids=ids, attention_mask=mask).logits
            if rows is None:
                rows = np.empty((len(examples), logits.shape[-1]), dtype=np.float32)
            rows[at] = logits.numpy()
        return rows if rows is not None else np.empty((0, 0), dtype=np.float32)

    def accuracy(self, examples: Sequence[Example], params: Mapping[str, np.ndarray] | None = None,
                 logit_bias: np.ndarray | None = None) -> float:
        """Accuracy of the global model, or of it with ``params`` (canonical names) swapped in;
        ``logit_bias`` [C] is added to every example's logits before the argmax."""
        return accuracy_of(self.logits(examples, params), examples, logit_bias)

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
        for ids, mask, _, lm_labels, _ in self._batches(examples):
            kw = {"input_ids": ids, "attention_mask": mask}
            logits = (torch.func.functional_call(model, swap, (), kw) if swap else model(**kw)).logits
            labels = lm_labels[:, 1:]  # padding and instruction prompts are never predicted
            nll += float(torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]),
                                                           labels.reshape(-1), ignore_index=-100, reduction="sum"))
            tokens += int((labels != -100).sum())
        text_bytes = sum(len(e.text.encode("utf-8")) for e in examples)
        n_tok = sum(int(m.sum()) for _, m, _, _, _ in self._batches(examples))
        return LMScore(float(np.exp(nll / max(tokens, 1))), tokens, text_bytes / max(n_tok, 1))


def label_prior_bias(own: np.ndarray, overall: np.ndarray) -> np.ndarray:
    """``log π_k − log π`` [C]: the logit shift that turns a model of the overall label mix ``π``
    into one of a client's mix ``π_k`` (Bayes' rule under label shift: ``p_k(y|x) ∝ p(y|x)·π_k(y)/π(y)``).

    ``own``, ``overall``: label counts [C] (the client's training labels, everyone's); add-one
    smoothing keeps an unseen class possible.
    """
    own, overall = np.asarray(own, np.float64) + 1.0, np.asarray(overall, np.float64) + 1.0
    return np.log(own / own.sum()) - np.log(overall / overall.sum())


def accuracy_of(logits: np.ndarray, examples: Sequence[Example], logit_bias: np.ndarray | None = None) -> float:
    """Share of ``examples`` whose label is the argmax of its row of ``logits`` [N, C] (+ ``logit_bias`` [C])."""
    if not len(examples):
        return 0.0
    scores = logits + (0.0 if logit_bias is None else logit_bias)
    return int((scores.argmax(-1) == np.array([e.label for e in examples])).sum()) / len(examples)


def label_prior_accuracies(ev: Evaluator, clients: Sequence, num_labels: int,
                           logits: Mapping[str, np.ndarray] | None = None) -> dict[str, float]:
    """The floor any personalization must beat: per client (``ClientSplit``: ``client``, ``train``,
    ``test``), the *global* model with the client's training label prior (:func:`label_prior_bias`)
    on the client's own test split. Ten numbers per client, no training. ``logits``: the global
    model's logits on each client's test split (``"c<k>"`` -> [N, C]) where the caller has them already."""
    counts = {c.client: np.bincount([e.label for e in c.train], minlength=num_labels)[:num_labels] for c in clients}
    overall = sum(counts.values())
    have = logits or {}
    return {f"c{c.client}": accuracy_of(have[f"c{c.client}"] if f"c{c.client}" in have else ev.logits(c.test), c.test,
                                        label_prior_bias(counts[c.client], overall)) for c in clients}
