"""The server's model: one global LoRA model, a tail per split point over its shared modules.

:class:`TailHost` owns the global adapters ``φ`` (every block) and the task head, trains the
tail on clients' smashed data, and hands out ``φ``'s head blocks for download. It is not thread
safe: the server calls it from one worker thread, off the event loop.

Optimizer schedule (:mod:`.schedule`): one optimizer step every ``server_step_every`` (``k``)
client steps, in the order received, never by arrival timing. :meth:`TailHost.train_batch` cuts a
batch of ``n`` requests at the group boundaries: the requests of one group see the same weights
and run as one forward/backward per split point; their gradients accumulate and the step is
taken when the group's k-th request is done, with the mean over the group (the objective of a
group is the mean of its clients' mean losses). A group left partial is stepped by
:meth:`TailHost.flush`, which the server calls at every round end (``ComputeWorker.end_round``).
Each client's ``g = ∂L_k/∂Z_k`` is exactly its own (unscaled): what it would get alone from the
same weights. So cross-client batching is an optimization only: the same sequence of requests
gives the same weights and the same ``g`` (up to float rounding of the summed gradients) however
it is cut into batches (tests/server_backend/test_schedule.py).

Logit-level alignment (``logit_kl`` rounds, :mod:`flexsfl.core.alignment`): a request with
``z_ref`` (Z' = head(x; φ)) and ``align_lambda`` λ > 0 gets back
``g = ∂L_task/∂Z + λ‖∂L_task/∂Z‖·a/‖a‖``, ``a = ∂/∂Z`` of the per-sequence mean
``KL(softmax(ℓ') || softmax(ℓ))`` with ``ℓ = tail(Z)`` and ``ℓ' = tail(Z')`` (no gradient, the
same weights), over the classes ([B, C]) or, for a causal LM, the vocabulary at every real token
([B, T, V], attention mask). The norms are over the request's own batch, the rule of the device's
feature_kl term, so λ means the same in both. The tail's parameters step on the task loss alone:
the term regularizes the personal head, not the shared tail. Each request's term depends only on
its own rows, so batching changes it no more than it changes ``g``. Cost: one more tail forward
(Z') and one more backward to Z per aligned request.

Device: ``TailHost(loaded, device="cuda:0")`` moves the model there once; every batch's ``Z``,
mask and labels go to the device when the batch runs and ``g`` comes back to host memory, so
callers only ever see numpy arrays, whatever the device. :func:`resolve_device` turns the CLI's
``--device`` into a :class:`torch.device`, or a one-line :class:`ConfigError` when it is not there.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Mapping, Sequence

import numpy as np
import torch

from flexsfl.core.alignment import scale_term
from flexsfl.core.constants import OPTIMIZERS
from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import LoadedModel
from flexsfl.model.partition import Head, Tail, block_of, build_head, build_tail, canonical_names, task_loss
from flexsfl.server_backend.logit_align import AlignedStep
from flexsfl.server_backend.schedule import StepSchedule, check_step_every

__all__ = ["OptimizerConfig", "StepRequest", "StepResult", "TailHost", "resolve_device"]

log = logging.getLogger("flexsfl.server.tail")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # "sgd" | "adamw"
    lr: float = 1e-3
    momentum: float = 0.0  # SGD only
    weight_decay: float | None = None  # None: torch's default (SGD 0, AdamW 0.01), as on the device
    server_step_every: int = 1  # k: one optimizer step per k client steps in the order received (schedule.py)

    def __post_init__(self) -> None:
        check_step_every(self.server_step_every)
        if self.name not in OPTIMIZERS:
            raise ConfigError(f"optimizer {self.name!r} is not supported; use {' or '.join(OPTIMIZERS)}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {self.lr}")

    def build(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        wd = {} if self.weight_decay is None else {"weight_decay": self.weight_decay}
        if self.name == "sgd":
            return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, **wd)
        return torch.optim.AdamW(params, lr=self.lr, **wd)


@dataclasses.dataclass(frozen=True)
class StepRequest:
    """One client's training step: smashed data and labels at its split point."""

    split: int
    z: np.ndarray  # [B, T, d] float32
    attention_mask: np.ndarray  # [B, T] int64
    labels: np.ndarray  # [B] (seq_cls) or [B, T] (causal_lm) int64
    tag: str = ""  # who asked ("client:round:step"), for the server's log
    z_ref: np.ndarray | None = None  # [B, T, d] float32: Z' = head(x; φ) of a logit_kl step (the term needs λ > 0 too)
    align_lambda: float = 0.0  # λ of the logit-level alignment term


@dataclasses.dataclass(frozen=True)
class StepResult:
    g: np.ndarray | None  # [B, T, d] float32: ∂L/∂Z (+ the logit-level term); None when the request was refused
    loss: float
    error: str | None = None  # why the request was refused (nothing was changed by it)
    align_loss: float = 0.0  # logit_kl: the per-sequence mean KL(softmax(ℓ') || softmax(ℓ))
    align_ratio: float = 0.0  # ‖term‖/‖∂L_task/∂Z‖: λ, or 0 when ℓ = ℓ' to float32 rounding
    align_gap: float = 0.0  # ‖ℓ - ℓ'‖/‖ℓ'‖ over real positions


def resolve_device(name: str | None) -> torch.device:
    """``cpu``, ``cuda`` or ``cuda:N`` as a :class:`torch.device`; ConfigError if CUDA (or GPU N) is missing."""
    name = (name or "cpu").strip()
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"--device {name!r} is not a device; use cpu, cuda or cuda:N") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"--device {name!r} is not supported; use cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu "
                          "or install a CUDA build of torch on a GPU machine")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here (cuda:0.."
                          f"cuda:{torch.cuda.device_count() - 1})")
    return dev


class TailHost:
    """The global model. ``params`` maps canonical names to the live trainable tensors (on ``device``)."""

    def __init__(self, loaded: LoadedModel, optimizer: OptimizerConfig = OptimizerConfig(),
                 device: str | torch.device | None = None) -> None:
        self.device = device if isinstance(device, torch.device) else resolve_device(device)
        if self.device.type != "cpu":
            loaded.model.to(self.device)
        self.loaded = loaded
        self.info = loaded.info
        names = canonical_names(loaded.model)
        self.params: dict[str, torch.nn.Parameter] = {
            names[id(p)]: p for p in loaded.model.parameters() if p.requires_grad
        }
        L = self.info.num_blocks
        self.blocks: dict[str, int] = {n: block_of(n, L) for n in self.params}
        self.optimizer_config = optimizer
        self.optimizer = optimizer.build(list(self.params.values()))
        self.schedule = StepSchedule(optimizer.server_step_every)  # shared with the U-shaped middle
        self._tails: dict[int, Tail] = {}
        self._heads: dict[int, Head] = {}
        self.steps = 0  # optimizer steps taken (tail and middle)

    # -- parts ---------------------------------------------------------------------------------
    def tail(self, split: int) -> Tail:
        if split not in self._tails:
            self._tails[split] = build_tail(self.loaded, split)
        return self._tails[split]

    def head(self, split: int) -> Head:
        if split not in self._heads:
            self._heads[split] = build_head(self.loaded, split)
        return self._heads[split]

    def head_names(self, split: int) -> list[str]:
        """Canonical names of ``φ``'s tensors in blocks ``0..split-1`` (what a client's head holds)."""
        return [n for n, j in self.blocks.items() if j < split]

    def head_specs(self, split: int) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.params[n].shape) for n in self.head_names(split)}

    # -- state ---------------------------------------------------------------------------------
    def head_params(self, split: int) -> dict[str, np.ndarray]:
        """A copy of ``φ^{0..split-1}``: the alignment reference and initial personal adapters."""
        return {n: _numpy(self.params[n]) for n in self.head_names(split)}

    def state(self) -> dict[str, np.ndarray]:
        """A copy of every trainable tensor (all adapters and the task head)."""
        return {n: _numpy(p) for n, p in self.params.items()}

    @torch.no_grad()
    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Overwrite trainable tensors by name. Unknown names or shapes are an error; nothing is
        changed unless every tensor fits."""
        for n, a in state.items():
            if n not in self.params:
                raise ConfigError(f"state tensor {n!r} is not a trainable tensor of {self.info.id}")
            if tuple(a.shape) != tuple(self.params[n].shape):
                raise ConfigError(f"state tensor {n!r} has shape {tuple(a.shape)}, expected {tuple(self.params[n].shape)}")
        for n, a in state.items():
            self.params[n].copy_(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))

    # -- compute -------------------------------------------------------------------------------
    def train_step(self, req: StepRequest) -> StepResult:
        return self.train_batch([req])[0]

    def train_batch(self, reqs: Sequence[StepRequest]) -> list[StepResult]:
        """Train ``reqs`` in order under the schedule: each run of requests that falls in one group
        is computed together (one forward per split point, one backward); a group's step is taken
        when its k-th request is done.

        A request whose loss or gradient is not finite is refused, takes no part in its group and
        counts for nothing (it would poison the shared tail); the others are unaffected.
        """
        results: list[StepResult | None] = [None] * len(reqs)
        i = 0
        while i < len(reqs):
            chunk = list(range(i, min(len(reqs), i + self.schedule.room())))
            self._train_chunk(reqs, chunk, results)
            i = chunk[-1] + 1
        return results  # type: ignore[return-value]

    def accumulate(self, grads: Mapping[torch.nn.Parameter, torch.Tensor], clients: int) -> bool:
        """Add the summed gradients of ``clients`` client steps to the open group (the middle
        calls this too); steps the optimizer when that completes the group. True if it stepped."""
        return self._apply(self.schedule.add(grads, clients))

    def flush(self) -> bool:
        """Step a group left partial (round end: call before reading or loading the state). True if it stepped."""
        return self._apply(self.schedule.take())

    def _apply(self, mean: Mapping[torch.nn.Parameter, torch.Tensor] | None) -> bool:
        if mean is None:
            return False
        self.optimizer.zero_grad(set_to_none=True)
        for p, g in mean.items():
            p.grad = g
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1
        return True

    def _train_chunk(self, reqs: Sequence[StepRequest], idx: list[int], results: list) -> None:
        """Requests ``idx`` (all in the open group) from the current weights; their gradients join the group."""
        out, grads = self._gradients([reqs[i] for i in idx])
        if grads is None and len(idx) > 1 and any(r is None for r in out):
            for i in idx:  # a gradient was not finite: find whose, alone (same weights: no step in between)
                self._train_chunk(reqs, [i], results)
            return
        ok = 0
        for i, r in zip(idx, out):
            results[i] = r or StepResult(None, math.nan, "the gradient for these activations is not finite")
            ok += results[i].g is not None
        if ok:
            self.accumulate(grads, ok)

    def _gradients(self, reqs: Sequence[StepRequest]) -> tuple[list[StepResult | None], dict | None]:
        """Per-request results and the summed parameter gradients of ``Σ_k L_k`` from the current
        weights, changing nothing. A result is None (and the gradients None) when the gradients
        came out non-finite; a request with a non-finite loss (or alignment KL) is refused and left out."""
        results: list[StepResult | None] = [None] * len(reqs)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.split, []).append(i)
        live: list[AlignedStep] = []
        for split, idx in groups.items():
            z, mask, labels, rows = _concat([reqs[i] for i in idx], self.info.task)
            if self.device.type != "cpu":
                z, mask, labels = (t.to(self.device, non_blocking=True) for t in (z, mask, labels))
            z.requires_grad_(True)
            logits = self.tail(split)(z, mask)
            refs = self._reference_logits(split, [reqs[i] for i in idx], mask, rows)
            for i, r, ref in zip(idx, rows, refs):
                loss = task_loss(logits[r], labels[r], self.info.task)
                if not math.isfinite(loss.item()):
                    results[i] = StepResult(None, math.nan, "the tail's loss is not finite for these activations")
                    continue
                item = AlignedStep(i, z, r, reqs[i].z.shape[1], loss)
                if ref is not None:
                    item.align(logits[r], ref, mask[r])
                    if not math.isfinite(item.align_loss):
                        results[i] = StepResult(None, math.nan, "the alignment KL of the tail's logits is not finite")
                        continue
                live.append(item)
        if not live:
            return results, None
        leaves = list({id(it.z): it.z for it in live}.values())
        params = list(self.params.values())
        total = torch.stack([it.loss for it in live]).sum()
        pulls = [it for it in live if it.kl is not None]
        gz = torch.autograd.grad(total, [*leaves, *params], allow_unused=True, retain_graph=bool(pulls))
        gzs, gps = dict(zip(map(id, leaves), gz[:len(leaves)])), gz[len(leaves):]
        grads = {p: g for p, g in zip(params, gps) if g is not None}
        gs = {it.i: _numpy(gzs[id(it.z)][it.rows, :it.t]) for it in live}
        a: dict[int, np.ndarray] = {}
        if pulls:  # ∂(Σ_k KL_k)/∂Z: request k's rows hold its own a_k; the parameters get nothing from it
            kl_leaves = list({id(it.z): it.z for it in pulls}.values())
            ga = dict(zip(map(id, kl_leaves), torch.autograd.grad(torch.stack([it.kl for it in pulls]).sum(), kl_leaves)))
            a = {it.i: _numpy(ga[id(it.z)][it.rows, :it.t]) for it in pulls}
        finite = [*gs.values(), *a.values()]
        if not all(np.isfinite(g).all() for g in finite) or not all(bool(torch.isfinite(g).all()) for g in grads.values()):
            return [r if r is not None and r.error else None for r in results], None
        for it in live:
            g, ratio = gs[it.i], 0.0
            if it.i in a:
                term, ratio = scale_term(g, a[it.i], reqs[it.i].align_lambda, it.gap)
                g = g + term
            results[it.i] = StepResult(g, it.loss.item(), align_loss=it.align_loss, align_ratio=ratio, align_gap=it.gap)
        return results, grads

    @torch.no_grad()
    def _reference_logits(self, split: int, reqs: Sequence[StepRequest], mask: torch.Tensor,
                          rows: list[slice]) -> list[torch.Tensor | None]:
        """``ℓ' = tail(Z')`` (no gradient) for each request of one split that aligns at the logits
        (``z_ref`` and λ > 0), else None; one forward for all of them, padded to ``mask``'s T as Z is."""
        want = [k for k, r in enumerate(reqs) if r.z_ref is not None and r.align_lambda > 0]
        out: list[torch.Tensor | None] = [None] * len(reqs)
        if not want:
            return out
        t, d = mask.shape[1], reqs[want[0]].z_ref.shape[2]
        zr = np.zeros((sum(reqs[k].z_ref.shape[0] for k in want), t, d), np.float32)
        sub, start = [], 0
        for k in want:
            b, tk = reqs[k].z_ref.shape[:2]
            zr[start:start + b, :tk] = reqs[k].z_ref
            sub.append(slice(start, start + b))
            start += b
        m = torch.cat([mask[rows[k]] for k in want])
        ref = self.tail(split)(torch.from_numpy(zr).to(self.device), m)
        for k, r in zip(want, sub):
            out[k] = ref[r]
        return out

    @torch.no_grad()
    def predict(self, split: int, z: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits of the global tail for smashed data (no training)."""
        z, attention_mask = np.array(z, dtype=np.float32), np.array(attention_mask, dtype=np.int64)
        dev = self.device
        return self.tail(split)(torch.from_numpy(z).to(dev), torch.from_numpy(attention_mask).to(dev)).cpu().numpy()

    @torch.no_grad()
    def predict_tokens(self, split: int, input_ids: np.ndarray, attention_mask: np.ndarray,
                       head_params: Mapping[str, np.ndarray] | None = None) -> np.ndarray:
        """Logits of the whole model for token ids, with optional personal head adapters swapped in
        (for evaluating a client's personal model where the server knows the test data)."""
        head = self.head(split)
        ids, mask = torch.from_numpy(input_ids).to(self.device), torch.from_numpy(attention_mask).to(self.device)
        if head_params:
            own = head.canonical()
            swap = {n: torch.from_numpy(np.asarray(head_params[c], dtype=np.float32)).to(self.device) for n, c in own.items()}
            z = torch.func.functional_call(head, swap, (ids, mask))
        else:
            z = head(ids, mask)
        return self.tail(split)(z, mask).cpu().numpy()


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A host-memory numpy copy of ``t``, wherever it lives."""
    t = t.detach()
    return t.cpu().numpy() if t.device.type != "cpu" else t.numpy().copy()


def _concat(reqs: Sequence[StepRequest], task: str):
    """Stack requests along the batch, right-padding T with masked zeros (padding is invisible to
    every query position that is not itself padding, so results equal running them alone).

    Returns fresh, writable tensors ``z`` [ΣB, T, d], ``mask``, ``labels`` and each request's rows.
    """
    t = max(r.z.shape[1] for r in reqs)
    rows, start = [], 0
    for r in reqs:
        rows.append(slice(start, start + r.z.shape[0]))
        start += r.z.shape[0]
    if len(reqs) == 1:
        r = reqs[0]
        return (torch.from_numpy(np.array(r.z, dtype=np.float32)), torch.from_numpy(np.array(r.attention_mask, dtype=np.int64)),
                torch.from_numpy(np.array(r.labels, dtype=np.int64)), rows)
    d = reqs[0].z.shape[2]
    z = np.zeros((start, t, d), np.float32)
    mask = np.zeros((start, t), np.int64)
    labels = np.full((start, t) if task == "causal_lm" else (start,), -100, np.int64)
    for r, rr in zip(reqs, rows):
        ti = r.z.shape[1]
        z[rr, :ti] = r.z
        mask[rr, :ti] = r.attention_mask
        if task == "causal_lm":
            labels[rr, :ti] = r.labels
        else:
            labels[rr] = r.labels
    return torch.from_numpy(z), torch.from_numpy(mask), torch.from_numpy(labels), rows
