"""The device's training logic in the U-shaped topology: a personal head *and* a personal top; no I/O.

A bundle exported with ``--top U`` holds the head's programs and the top's (``top_train`` /
``top_eval``, :mod:`.top`). The device keeps its labels: the server only ever sees ``Z`` and
``dL/dH``. One step::

    step = trainer.forward()              # Z = head(x; θ_head); step.labels is None: they stay here
    ... send Z and the mask; receive H ...
    grad_h, loss = trainer.top_step(h)    # loss, dL/dH from the top with the local labels; θ_top steps
    ... send dL/dH and the loss; receive g = dL/dZ ...
    trainer.backward(g, loss)             # as HeadTrainer: G = g (+ alignment); θ_head steps

**Alignment at the top's input** (``RoundSettings.align_top``, from ``RoundConfig.align_top``):
besides the head's term at Z, the device pulls its personal path towards the global one at H.
A step that aligns sends ``Z' = head(x; φ)`` with Z (:attr:`UTrainer.pending_z_ref`) and gets
``H' = middle_φ(Z')`` back with H; :meth:`UTrainer.top_step` then sends
``G_H = dL/dH + λ‖dL/dH‖·a_H/‖a_H‖``, ``a_H = ∂/∂H`` of the per-sequence mean
``KL(softmax(H') || softmax(H))`` — :func:`~.alignment.aligned_gradient`, the head term's own
function and normalization, so λ means the same at both places (``align_top_ratio`` = λ). The
top's own gradients come from the task loss alone; the term reaches the middle's and the head's
adapters through the server's backward. Z' must travel with Z, so it cannot wait for the
server as the head's reference does: the device draws the *next* step's batch and computes its
Z' in :meth:`UTrainer.align_reference` (the transport's worker thread, while it waits for H and
g; φ is fixed for the round), so only a round's first aligned step computes Z' on the critical path.

Evaluation of the personal model is head -> the server's middle -> this device's top:
:meth:`UTrainer.score_top` scores the top's logits for ``H`` locally, so neither labels nor
predictions leave the device.

θ_top (the top blocks' LoRA adapters and the task head, by canonical name) is part of the
personal model: it is uploaded with the head's tensors (layer-wise aggregation reads both by
name), set from the global adapters at the first round (or every round when the plan says not
personal), and saved with its optimizer state in ``top.safetensors`` beside the head's state.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Mapping, Sequence

import numpy as np

from flexsfl.core.atomic import atomic_write_many
from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import ConfigError
from flexsfl.core.scoring import Score, cls_score, lm_score
from flexsfl.edge_runtime.alignment import align_reference, aligned_gradient
from flexsfl.edge_runtime.backends import Backend
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.optim import make_optimizer
from flexsfl.edge_runtime.top import TopRunner
from flexsfl.edge_runtime.trainer import HeadTrainer, RoundSettings, RoundStats, Step

__all__ = ["URoundStats", "UTrainer"]

log = logging.getLogger("flexsfl.edge.u")

_TOP_FILE = "top.safetensors"


@dataclasses.dataclass
class URoundStats(RoundStats):
    """:class:`RoundStats` plus the top's step time (counted in ``client_compute_ms`` too) and the
    alignment term at the top's input (per step that applied it)."""

    top_s: float = 0.0  # the top's fused step, and the alignment term at H
    align_top_loss_sum: float = 0.0  # per-sequence mean KL(softmax(H') || softmax(H))
    align_top_ratio_sum: float = 0.0  # ‖λ-term‖/‖dL/dH‖: λ, or 0 when H = H' to float32 rounding
    align_top_gap_sum: float = 0.0  # ‖H - H'‖/‖H'‖
    align_top_steps: int = 0

    def compute_s(self) -> float:
        return super().compute_s() + self.top_s

    def as_metrics(self) -> dict[str, float | int]:
        out = super().as_metrics()
        n, na = max(self.steps, 1), max(self.align_top_steps, 1)
        out["top_ms"] = 1e3 * self.top_s / n
        out["client_compute_ms"] += out["top_ms"]
        out.update(align_top_loss=self.align_top_loss_sum / na, align_top_ratio=self.align_top_ratio_sum / na,
                   align_top_gap=self.align_top_gap_sum / na, align_top_steps=self.align_top_steps)
        return out


class UTrainer(HeadTrainer):
    """Trains one personal head and one personal top on local examples; labels never leave it."""

    def __init__(self, bundle: Bundle, backend: Backend, top: TopRunner, train: Sequence[Example],
                 test: Sequence[Example] = (), **kw) -> None:
        self.top = top  # before HeadTrainer restores state, which includes the top's
        self._top_opt = None
        self._opt_key_top: tuple | None = None
        self._labels_pending: np.ndarray | None = None
        self._h_pending = False
        self._z_ref: np.ndarray | None = None  # the pending step's Z', sent with Z (align_top)
        self._prefetched: tuple[list[Example], np.ndarray | None] | None = None  # next batch, drawn early, and its Z'
        self._ready_ref: np.ndarray | None = None  # Z' of the batch forward() just took from _prefetched
        super().__init__(bundle, backend, train, test, **kw)
        self.stats = URoundStats()

    @property
    def top_blocks(self) -> int:
        """u: the blocks of the top (Hello.top)."""
        return int(self.top.info["blocks"])

    # -- rounds --------------------------------------------------------------------------------
    def begin_round(self, settings: RoundSettings, adapters: Mapping[str, np.ndarray] | None) -> None:
        """Take the global adapters (head and top tensors by name) and set up both optimizers."""
        first = not self.has_personal or not settings.personal
        head = top = None
        if adapters is not None:
            names = set(self.top.params)
            top = {k: v for k, v in adapters.items() if k in names}
            head = {k: v for k, v in adapters.items() if k not in names}
            if top and set(top) != names:
                raise ConfigError(f"the server sent {len(top)} of the top's {len(names)} tensors; "
                                  "server and bundle disagree on the top's layout")
            if first and names and not top:  # a causal LM's top of 0 blocks trains nothing (the LM head is frozen)
                raise ConfigError("the server sent no top adapters for this U-shaped client's first round; "
                                  "run the server with a strategy that plans U-shaped clients (flexpsfl, flexpsfl-u)")
        super().begin_round(settings, head)
        if first and top:
            self.top.set_params(top)
            self._top_opt = None
        key = (settings.optimizer, settings.lr)
        if self._top_opt is None or key != self._opt_key_top:
            self._top_opt = make_optimizer(settings.optimizer, lr=settings.lr)
            self._opt_key_top = key
        if self._prefetched is not None:  # drawn in a round that broke off: keep the batch, not its Z' (φ is new)
            self._prefetched = (self._prefetched[0], None)
        self._z_ref = None
        self.stats = URoundStats()

    @property
    def align_top(self) -> bool:
        """Whether this round applies the alignment term at the top's input too."""
        s = self.settings
        return s is not None and s.align_top and s.align_lambda > 0

    @property
    def pending_z_ref(self) -> np.ndarray | None:
        """Z' of the pending step, to send with Z (Activations.z_ref); None when the step does not align at H."""
        return self._z_ref

    def forward(self) -> Step:
        """Next local batch -> Z; the batch's labels stay in the trainer (``Step.labels`` is None).
        With align_top, a step that aligns also has its Z' ready (:attr:`pending_z_ref`)."""
        step = super().forward()
        self._labels_pending = step.labels
        self._z_ref = None
        if self.align_top and self._ref_inputs is not None:  # this step aligns: Z' goes up with Z
            ids, mask = self._ref_inputs
            self._ref_inputs = None
            z_ref = self._ready_ref
            if z_ref is None:  # a round's first step, or the serial order: Z' now, on the critical path
                t0 = time.perf_counter()
                z_ref = self.backend.forward(ids, mask, params=self.phi, keep=False)
                self.stats.align_s += time.perf_counter() - t0
            self._ref = align_reference(step.z, z_ref, mask)  # the head's term at Z, as without align_top
            self._z_ref = z_ref
        self._ready_ref = None
        return dataclasses.replace(step, labels=None)

    @property
    def needs_reference(self) -> bool:
        """Whether :meth:`align_reference` has work: the head's Z' (without align_top), or the next step's (with)."""
        return self._prefetch_due() if self.align_top else super().needs_reference

    def align_reference(self) -> None:
        """Without align_top, the head's Z' for the pending step (:meth:`HeadTrainer.align_reference`).
        With it, the pending step's Z' is already on the wire: draw the next step's batch and compute
        its Z' now, while the device waits for the server (the transport runs this in a thread;
        nothing else may use the backend until it returns). The same numbers as computing it in
        :meth:`forward`: φ does not change within a round, and the batch order is the cursor's."""
        if not self.align_top:
            return super().align_reference()
        if not self._prefetch_due():
            return
        s = self.settings
        t0 = time.perf_counter()
        batch = self.cursor.next(s.batch_size)
        enc = self.encoder.encode([e.text for e in batch])
        self._prefetched = (batch, self.backend.forward(enc.input_ids, enc.attention_mask, params=self.phi, keep=False))
        self.stats.align_s += time.perf_counter() - t0

    def _prefetch_due(self) -> bool:
        """A step is pending (Z sent), the next one is in this round and aligns, and its Z' is not drawn yet."""
        s = self.settings
        n = self.stats.steps + 1  # the next step's index in the round
        return (s is not None and self.overlap_alignment and self._pending is not None and self._prefetched is None
                and self.phi is not None and n < s.local_steps and n % self.align_every == 0)

    def _next_batch(self, size: int) -> list[Example]:
        if self._prefetched is None:
            self._ready_ref = None
            return super()._next_batch(size)
        batch, self._ready_ref = self._prefetched
        self._prefetched = None
        return batch

    def top_step(self, h: np.ndarray, h_ref: np.ndarray | None = None) -> tuple[np.ndarray, float]:
        """The top's fused step on the server's ``H`` for the pending batch: returns ``(dL/dH, loss)``
        and steps θ_top. With ``h_ref`` (H' = middle_φ(Z'), exactly when the step sent Z'), the
        returned gradient is ``G_H = dL/dH + λ‖dL/dH‖·a_H/‖a_H‖``; θ_top's step uses the task loss
        alone. A bad ``H`` is a one-line ConfigError and changes nothing."""
        s = self._require_round()
        if self._pending is None or self._labels_pending is None or self._h_pending:
            raise ConfigError("top_step() needs a forward() and one H per step")
        if (h_ref is None) != (self._z_ref is None):
            raise ConfigError("the server's H' does not match this step: a step that sends Z' needs H' back, "
                              "and only such a step; is the server's flexsfl older than this device's?")
        _, _, mask = self._pending
        t0 = time.perf_counter()
        out = self.top.train_step(h, mask, self._labels_pending)
        self._top_opt.step(self.top.params, out.grads)
        grad_h = out.grad_h
        if h_ref is not None:
            term = aligned_gradient(grad_h, h, h_ref, mask, s.align_lambda)
            grad_h = grad_h + term.grad
            st = self.stats
            st.align_top_loss_sum += term.loss
            st.align_top_ratio_sum += term.ratio
            st.align_top_gap_sum += term.gap
            st.align_top_steps += 1
        self.stats.top_s += time.perf_counter() - t0
        self._h_pending = True
        return grad_h, out.loss

    def backward(self, g: np.ndarray, loss: float) -> None:
        if not self._h_pending:
            raise ConfigError("backward() before top_step(): a U-shaped step needs H first")
        super().backward(g, loss)
        self._h_pending = False
        self._labels_pending = None
        self._z_ref = None

    def upload(self) -> tuple[dict[str, np.ndarray], int]:
        """θ_head and θ_top by canonical name, and the samples behind them."""
        params, n = super().upload()
        return {**params, **self.top.get_params()}, n

    # -- evaluation ----------------------------------------------------------------------------
    def score_top(self, h: np.ndarray, step: Step) -> Score:
        """What the personal top's predictions for ``H`` of an eval batch score, here on the device:
        classes for classification; next tokens (labels not -100) and their summed NLL for a causal LM."""
        logits = self.top.predict(h, step.attention_mask)
        if self.task == "causal_lm":
            return lm_score(logits, step.labels)
        return cls_score(logits, step.labels)

    # -- persistence ---------------------------------------------------------------------------
    def save(self) -> None:
        """The head's state (HeadTrainer), then θ_top and its optimizer state in ``top.safetensors``."""
        from safetensors.numpy import save_file

        super().save()
        tensors = {f"theta/{k}": v for k, v in self.top.get_params().items()}
        if self._top_opt is not None:
            tensors.update({f"opt/{k}": v for k, v in self._top_opt.state_dict().items()})
        atomic_write_many({self.state_dir / _TOP_FILE: lambda tmp: save_file(
            {k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp))})

    def _restore(self) -> None:
        super()._restore()
        path = self.state_dir / _TOP_FILE
        if not self.has_personal or not path.exists():
            if self.has_personal:  # a head without its top: the pair is not one personal model
                log.warning("%s has a personal head but no %s; the top starts from the round's global adapters",
                            self.state_dir, _TOP_FILE)
                self.has_personal = False
            return
        from safetensors.numpy import load_file

        try:
            tensors = load_file(str(path))
            self.top.set_params({k[6:]: v for k, v in tensors.items() if k.startswith("theta/")})
        except Exception as e:  # noqa: BLE001 - safetensors errors, or a ConfigError naming the tensor
            raise ConfigError(f"{path}: unusable personal top ({e}); move {self.state_dir} aside to start afresh") from None
        if self._opt_key is not None:
            name, lr = self._opt_key
            self._top_opt = make_optimizer(name, lr=lr)
            self._top_opt.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("opt/")})
            self._opt_key_top = self._opt_key
        log.info("restored the personal top from %s", path)
