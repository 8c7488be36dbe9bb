"""The server's model: one global LoRA model, a tail per split point over its shared modules.

:class:`TailHost` owns the global adapters ``φ`` (every block) and the task head, trains the
tail on clients' smashed data, and hands out ``φ``'s head blocks for download. It is not thread
safe: the server calls it from one worker thread, off the event loop.

Cross-client batching: :meth:`TailHost.train_batch` runs the requests that arrived together as one
forward/backward per split point. The objective is the *sum* of the clients' mean losses, so each
client's ``g = ∂L_k/∂Z_k`` is exactly what it would get alone from the same weights; the tail then
takes one optimizer step with the summed gradient instead of one step per request.

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

from flexsfl.core.constants import OPTIMIZERS
from flexsfl.core.errors import ConfigError
from flexsfl.model.loading import LoadedModel
from flexsfl.model.partition import Head, Tail, block_of, build_head, build_tail, canonical_names, task_loss

__all__ = ["OptimizerConfig", "StepRequest", "StepResult", "TailHost", "resolve_device"]

log = logging.getLogger("flexsfl.server.tail")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    name: str = "sgd"  # "sgd" | "adamw"
    lr: float = 1e-3
    momentum: float = 0.0  # SGD only
    weight_decay: float | None = None  # None: torch's default (SGD 0, AdamW 0.01), as on the device

    def __post_init__(self) -> None:
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


@dataclasses.dataclass(frozen=True)
class StepResult:
    g: np.ndarray | None  # [B, T, d] float32: ∂L/∂Z; None when the request was refused
    loss: float
    error: str | None = None  # why the request was refused (nothing was changed by it)


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
        self._tails: dict[int, Tail] = {}
        self._heads: dict[int, Head] = {}
        self.steps = 0

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
        """One optimizer step over all requests (grouped by split point).

        A request whose loss is not finite is refused and takes no part in the step; if any
        gradient comes out non-finite the whole step is refused (it would poison the shared
        tail), and nothing changes.
        """
        results: list[StepResult | None] = [None] * len(reqs)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(reqs):
            groups.setdefault(r.split, []).append(i)
        live = []  # (request index, z leaf, its rows, its T, its loss)
        self.optimizer.zero_grad(set_to_none=True)
        for split, idx in groups.items():
            z, mask, labels, rows = _concat([reqs[i] for i in idx], self.info.task)
            if self.device.type != "cpu":
                z, mask, labels = (t.to(self.device, non_blocking=True) for t in (z, mask, labels))
            z.requires_grad_(True)
            logits = self.tail(split)(z, mask)
            for i, r in zip(idx, rows):
                loss = task_loss(logits[r], labels[r], self.info.task)
                if math.isfinite(loss.item()):
                    live.append((i, z, r, reqs[i].z.shape[1], loss))
                else:
                    results[i] = StepResult(None, math.nan, "the tail's loss is not finite for these activations")
        if live:
            torch.stack([loss for *_, loss in live]).sum().backward()
            grads = {i: _numpy(z.grad[r, :t]) for i, z, r, t, _ in live}
            bad = {i for i, g in grads.items() if not np.isfinite(g).all()}
            if bad:
                for i, *_ in live:
                    why = "the gradient for these activations is not finite" if i in bad else (
                        "another request in the same batch was not finite; retry")
                    results[i] = StepResult(None, math.nan, why)
            else:
                self.optimizer.step()
                self.steps += 1
                for i, *_, loss in live:
                    results[i] = StepResult(grads[i], loss.item())
            self.optimizer.zero_grad(set_to_none=True)
        return results  # type: ignore[return-value]

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
