"""The device's training logic for one personal head, with no I/O.

:class:`HeadTrainer` turns local examples into smashed data and applies the server's gradients;
the websocket transport (:mod:`.transport`) moves its arrays. One step::

    step = trainer.forward()              # Z = head(x; θ_k) for the next local batch
    ... send step.z, step.attention_mask, step.labels; then, while the server works:
    trainer.align_reference()             # Z' = head(x; φ) when λ > 0 (in a worker thread)
    ... receive g, loss ...
    trainer.backward(g, loss)             # G = g + λ‖g‖·∇align/‖∇align‖; θ_k -= optimizer(∂(Σ Z·G)/∂θ)

The alignment reference Z' needs only x and φ, not g, so it is off the critical path: the
transport computes it after Z is on the wire, while the device would wait for the server anyway.
The backend sees the same calls in the same order as when Z' is computed right after Z
(``overlap_alignment=False``, or a caller that skips :meth:`HeadTrainer.align_reference`:
:meth:`HeadTrainer.backward` then computes it first), so the numbers are identical.
``align_every = k`` computes Z' (and applies the alignment term) on every k-th step of a round
only, saving the other steps' forward through φ.

In a ``logit_kl`` round (``RoundSettings.alignment``, from RoundConfig) the term is the server's:
:meth:`HeadTrainer.forward` computes Z' right after Z, *on the critical path* (it goes up with
Z: ``Step.z_ref``), the server returns ``g`` with the logit-level term already in it, and
:meth:`HeadTrainer.backward` applies ``G = g``; what the server says it added
(``Gradients.align_*``) goes into the round's stats through :meth:`HeadTrainer.server_alignment`.
Every train step of such a round must carry Z' (the protocol refuses one without), so
``align_every`` > 1 is refused for it.

Across rounds the trainer keeps θ_k (the personal head) unless the round's plan says otherwise
(SplitFed starts every round from the global head), and its place in the local data. After every
round :meth:`HeadTrainer.save` writes θ_k, the optimizer state and the data cursor to the state
directory, so a restarted device resumes with its personal model.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Iterator, Mapping, Protocol, Sequence

import numpy as np

from flexsfl.edge_runtime.alignment import AlignReference, align_reference, apply_alignment
from flexsfl.edge_runtime.backends import Backend
from flexsfl.core.atomic import atomic_write_many
from flexsfl.core.bundle import Bundle
from flexsfl.edge_runtime.data import Example, batches
from flexsfl.core.errors import ConfigError, TensorError
from flexsfl.core.scoring import Score, cls_score, summed
from flexsfl.edge_runtime.optim import make_optimizer
from flexsfl.edge_runtime.text import TextEncoder, TokenBatch

__all__ = ["RoundSettings", "Step", "RoundStats", "BatchCursor", "Trainer", "HeadTrainer", "write_device_state"]

log = logging.getLogger("flexsfl.edge.trainer")

_STATE_FILE = "personal.safetensors"
_META_FILE = "personal.json"



def write_device_state(tensors_path: pathlib.Path, meta_path: pathlib.Path, tensors: Mapping[str, np.ndarray],
                       meta: dict) -> None:
    """A device's state on disk: ``tensors`` (safetensors) and ``meta`` (sorted JSON), written
    atomically, data first and sidecar last, so the JSON never describes tensors that are not on disk."""
    from safetensors.numpy import save_file

    atomic_write_many({
        tensors_path: lambda tmp: save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(tmp)),
        meta_path: lambda tmp: tmp.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n"),
    })

@dataclasses.dataclass(frozen=True)
class RoundSettings:
    """What the server asked for this round (from RoundConfig)."""

    round_id: int
    local_steps: int
    batch_size: int
    lr: float
    optimizer: str
    align_lambda: float
    personal: bool = True  # keep θ_k across rounds (False: start from the global head)
    align_top: bool = False  # U-shaped: the alignment term also at the top's input H (RoundConfig.align_top)
    alignment: str = "feature_kl"  # feature_kl: the term here, at Z; logit_kl: the server's, at the logits (Z' goes up)
    local_rule: str = "plain"  # whole-model devices: plain | fedrep | ditto (RoundConfig.local_rule)
    head_steps: int = 0  # fedrep: the first head_steps train the task head alone
    prox_mu: float = 0.0  # ditto: the personal model's proximal weight


@dataclasses.dataclass(frozen=True)
class Step:
    """One local batch after the head's forward, waiting for the server's gradient."""

    z: np.ndarray  # [B, T, d] float32, the smashed data
    attention_mask: np.ndarray  # [B, T] int64
    labels: np.ndarray  # [B] or [B, T] int64
    z_ref: np.ndarray | None = None  # [B, T, d] float32: Z' = head(x; φ), sent with Z in a logit_kl round


@dataclasses.dataclass
class RoundStats:
    """Measured on the device during one round."""

    steps: int = 0
    samples: int = 0
    tokens: int = 0  # real (unpadded) tokens trained on
    loss_sum: float = 0.0
    align_loss_sum: float = 0.0
    align_ratio_sum: float = 0.0  # ‖λ∇align‖/‖g‖ per step (alignment.aligned_gradient; logit_kl: the server's)
    align_gap_sum: float = 0.0  # ‖Z - Z'‖/‖Z'‖ per step (logit_kl: ‖ℓ - ℓ'‖/‖ℓ'‖): how far the personal output is from φ's
    forward_s: float = 0.0  # head forward of Z
    align_s: float = 0.0  # head forward of Z' through φ (off the critical path when overlapped)
    backward_s: float = 0.0  # head backward + optimizer step
    step_s: float = 0.0  # device wall time per step: forward() start to backward() end, the wait included
    aligned_steps: int = 0  # steps that computed Z' and applied the alignment term

    def as_metrics(self) -> dict[str, float | int]:
        n, na = max(self.steps, 1), max(self.aligned_steps, 1)
        return {
            "steps": self.steps,
            "samples": self.samples,
            "loss": self.loss_sum / n,
            "align_loss": self.align_loss_sum / na,
            "align_ratio": self.align_ratio_sum / na,
            "align_gap": self.align_gap_sum / na,
            "forward_ms": 1e3 * self.forward_s / n,
            "align_ms": 1e3 * self.align_s / n,
            "backward_ms": 1e3 * self.backward_s / n,
            "client_compute_ms": 1e3 * (self.forward_s + self.align_s + self.backward_s) / n,
            "step_ms": 1e3 * self.step_s / n,
            "aligned_steps": self.aligned_steps,
            # tokens per second of the device's own compute (head, alignment, and top in U mode)
            "tokens_per_s": self.tokens / max(self.compute_s(), 1e-9) if self.tokens else 0.0,
        }

    def compute_s(self) -> float:
        """Seconds of the device's own compute this round (no waiting)."""
        return self.forward_s + self.align_s + self.backward_s


class BatchCursor:
    """Endless shuffled mini-batches over local examples; the position survives restarts.

    Epoch ``e`` is :func:`~.data.batches` with ``(seed, e)``; ``position`` counts the batches
    already taken in the current epoch.
    """

    def __init__(self, examples: Sequence[Example], seed: int, epoch: int = 0, position: int = 0) -> None:
        self.examples, self.seed, self.epoch, self.position = examples, seed, epoch, position
        self._it: Iterator[list[Example]] | None = None
        self._size: int | None = None

    def next(self, size: int) -> list[Example]:
        if self._it is None or size != self._size:
            # (Re)start the epoch's stream at the saved position (a new batch size restarts it).
            self._it, self._size = batches(self.examples, size, seed=self.seed, epoch=self.epoch), size
            for _ in range(self.position):
                next(self._it, None)
        batch = next(self._it, None)
        if batch is None:
            self.epoch, self.position = self.epoch + 1, 0
            self._it = batches(self.examples, size, seed=self.seed, epoch=self.epoch)
            batch = next(self._it)
        self.position += 1
        return batch


class Trainer(Protocol):
    """What the transport drives: one client's training, with no I/O.

    A split trainer (``whole_model = False``) is stepped by the server: ``forward`` gives the
    smashed data of one batch, ``backward`` applies the gradient that came back. A whole-model
    trainer (the FedAvg / local-only baselines) trains a round by itself in ``train_local``.
    """

    whole_model: bool
    bundle: Bundle
    task: str
    test_set: list[Example]
    stats: RoundStats

    @property
    def backend_name(self) -> str: ...
    def begin_round(self, settings: RoundSettings, adapters: Mapping[str, np.ndarray] | None) -> None: ...
    def forward(self) -> Step: ...
    def backward(self, g: np.ndarray, loss: float) -> None: ...
    def train_local(self) -> None: ...
    def upload(self) -> tuple[dict[str, np.ndarray], int]: ...
    def end_round(self) -> None: ...
    def eval_batches(self) -> Iterator[Step]: ...
    def evaluate(self) -> Score: ...


class HeadTrainer:
    """Trains one personal head with a backend, on local examples."""

    whole_model = False

    def __init__(self, bundle: Bundle, backend: Backend, train: Sequence[Example], test: Sequence[Example] = (),
                 *, seed: int = 0, state_dir: str | os.PathLike | None = None, eval_batch_size: int | None = None,
                 align_every: int = 1, overlap_alignment: bool = True) -> None:
        m = bundle.manifest
        if not isinstance(align_every, int) or align_every < 1:
            raise ConfigError(f"--align-every must be a whole number >= 1 (1: every step), got {align_every!r}")
        self.align_every = align_every
        self.overlap_alignment = overlap_alignment  # False: Z' right after Z in forward() (the serial order)
        if not train:
            raise ConfigError("no training examples: give --data a non-empty CSV/JSONL file")
        for where, exs in (("train", train), ("test", test)):
            bad = next((e for e in exs if e.label >= m.model.num_labels), None)
            if bad is not None and m.model.task == "seq_cls":
                raise ConfigError(f"{where} data has label {bad.label}, but the model has {m.model.num_labels} classes")
        self.bundle = bundle
        self.backend = backend
        self.encoder = TextEncoder.from_bundle(bundle)
        self.train_set = list(train)
        self.test_set = list(test)
        self._eval_order: list[Example] | None = None  # test_set by token count (eval_batches)
        self.seed = seed
        self.task = m.model.task
        self.eval_batch_size = min(eval_batch_size or m.max_batch, m.max_batch)
        self.state_dir = pathlib.Path(state_dir) if state_dir else None
        self.settings: RoundSettings | None = None
        self.phi: dict[str, np.ndarray] | None = None  # the global head: alignment reference
        self.has_personal = False  # θ_k has been initialised (from φ or a checkpoint)
        self.cursor = BatchCursor(self.train_set, seed)
        self._optimizer = None
        self._opt_key: tuple | None = None
        self._pending: tuple[np.ndarray, None, np.ndarray] | None = None  # (z, unused, mask)
        self._ref_inputs: tuple[np.ndarray, np.ndarray] | None = None  # (ids, mask) whose Z' is still to compute
        self._ref: AlignReference | None = None  # the pending step's g-independent alignment, once computed
        self._t_step = 0.0
        self.stats = RoundStats()
        self.last_round = -1
        if self.state_dir is not None:
            self._restore()

    @property
    def backend_name(self) -> str:
        return self.backend.name

    # -- rounds --------------------------------------------------------------------------------
    def begin_round(self, settings: RoundSettings, adapters: Mapping[str, np.ndarray] | None) -> None:
        """Start a round: take the global head ``φ`` (if sent) and set up the optimizer."""
        if settings.batch_size > self.bundle.manifest.max_batch:
            raise ConfigError(f"the server asks for batch {settings.batch_size}, over this bundle's limit "
                              f"{self.bundle.manifest.max_batch}; re-export with a larger --max-batch")
        if settings.alignment == "logit_kl" and settings.align_lambda > 0 and self.align_every > 1:
            raise ConfigError(f"the server aligns at the logits (logit_kl), which needs Z' with every step; restart this "
                              f"device without --align-every {self.align_every}")
        self.settings = settings
        if adapters is not None:
            self.phi = {k: np.array(v, dtype=np.float32) for k, v in adapters.items()}
            if not self.has_personal or not settings.personal:
                self.backend.set_params(self.phi)  # θ_k <- φ: the first round, or no personalization
                self.has_personal = True
                self._optimizer = None  # new starting point: fresh optimizer state
        elif not self.has_personal:
            raise ConfigError("the server sent no adapters and this device has no personal head yet")
        key = (settings.optimizer, settings.lr)
        if self._optimizer is None or key != self._opt_key:
            self._optimizer = make_optimizer(settings.optimizer, lr=settings.lr)
            self._opt_key = key
        self.stats = RoundStats()

    def forward(self) -> Step:
        """Next local batch -> Z (kept for :meth:`backward`). Z' from φ, when this step aligns,
        is left to :meth:`align_reference` (or computed here if ``overlap_alignment`` is off)."""
        s = self._require_round()
        self._t_step = time.perf_counter()
        batch = self._next_batch(s.batch_size)
        enc = self.encoder.encode([e.text for e in batch])
        labels = self._labels(batch, enc.input_ids, enc.attention_mask)
        t0 = time.perf_counter()
        z = self.backend.forward(enc.input_ids, enc.attention_mask, keep=True)
        self.stats.forward_s += time.perf_counter() - t0
        self._pending = (z, None, enc.attention_mask)
        self._ref = None
        aligns = s.align_lambda > 0 and self.phi is not None and self.stats.steps % self.align_every == 0
        self._ref_inputs = (enc.input_ids, enc.attention_mask) if aligns else None
        z_ref = None
        if aligns and s.alignment == "logit_kl":  # Z' goes up with Z: computed now, on the critical path
            self._ref_inputs = None
            t0 = time.perf_counter()
            z_ref = self.backend.forward(enc.input_ids, enc.attention_mask, params=self.phi, keep=False)
            self.stats.align_s += time.perf_counter() - t0
        elif not self.overlap_alignment:
            self.align_reference()
        self.stats.samples += len(batch)
        self.stats.tokens += int(enc.attention_mask.sum())
        return Step(z, enc.attention_mask, labels, z_ref)

    @property
    def needs_reference(self) -> bool:
        """Whether the pending step still has a Z' to compute (:meth:`align_reference`)."""
        return self._ref_inputs is not None

    def align_reference(self) -> None:
        """Compute Z' = head(x; φ) for the step :meth:`forward` just took, if it aligns, and the
        part of the alignment term that does not need g (the KL gradient, its norm); else nothing.

        Meant to run in a worker thread between sending Z and receiving g: nothing else may use
        the backend until it returns (the transport awaits it before :meth:`backward`).
        """
        if self._ref_inputs is None:
            return
        ids, mask = self._ref_inputs
        self._ref_inputs = None
        t0 = time.perf_counter()
        z_ref = self.backend.forward(ids, mask, params=self.phi, keep=False)
        self._ref = align_reference(self._pending[0], z_ref, mask)
        self.stats.align_s += time.perf_counter() - t0

    def backward(self, g: np.ndarray, loss: float) -> None:
        """Apply the server's ``g = ∂L/∂Z`` (plus the alignment gradient) to θ_k."""
        s = self._require_round()
        if self._pending is None:
            raise ConfigError("backward() without a forward(): one gradient per step")
        z = self._pending[0]
        if g.shape != z.shape:
            raise TensorError(f"the server's gradient has shape {list(g.shape)}, Z was {list(z.shape)}")
        if not np.isfinite(g).all():
            raise TensorError("the server's gradient has non-finite values")
        self.align_reference()  # no-op unless the caller left Z' to compute: same call order either way
        ref, self._ref = self._ref, None
        self._pending = None
        t0 = time.perf_counter()
        G = g
        if ref is not None:
            term = apply_alignment(g, ref, s.align_lambda)  # λ·‖g‖ along the KL gradient
            G = g + term.grad
            self.stats.align_loss_sum += term.loss
            self.stats.align_ratio_sum += term.ratio
            self.stats.align_gap_sum += term.gap
            self.stats.aligned_steps += 1
        grads = self.backend.backward(G)
        self._optimizer.step(self.backend.params, grads)
        t1 = time.perf_counter()
        self.stats.backward_s += t1 - t0
        self.stats.step_s += t1 - self._t_step
        self.stats.steps += 1
        self.stats.loss_sum += float(loss)

    def server_alignment(self, loss: float, ratio: float, gap: float) -> None:
        """Count the logit-level term the server put into this step's ``g`` (a logit_kl step: its
        Gradients' ``align_loss``, ``align_ratio``, ``align_gap``) in the round's stats, as the
        device's own term is counted."""
        st = self.stats
        st.align_loss_sum += loss
        st.align_ratio_sum += ratio
        st.align_gap_sum += gap
        st.aligned_steps += 1

    def upload(self) -> tuple[dict[str, np.ndarray], int]:
        """θ_k and the number of samples it was trained on this round."""
        return self.backend.get_params(), max(self.stats.samples, 1)

    def end_round(self) -> None:
        """The round is aggregated: persist θ_k, optimizer state and the data cursor."""
        if self.settings is not None:
            self.last_round = self.settings.round_id
        self.settings = None
        if self.state_dir is not None:
            self.save()

    # -- evaluation ----------------------------------------------------------------------------
    def eval_batches(self) -> Iterator[Step]:
        """Forward passes over the local test split (no gradient kept), in batches of similar length
        (the split sorted by token count once, each batch padded to its longest), so little of the
        device's and the server's work is padding; the score is a count, whatever the order."""
        if self._eval_order is None:
            lengths = self.encoder.encode([e.text for e in self.test_set]).attention_mask.sum(axis=1)
            self._eval_order = [self.test_set[j] for j in np.argsort(lengths, kind="stable")]
        for i in range(0, len(self._eval_order), self.eval_batch_size):
            batch = self._eval_order[i : i + self.eval_batch_size]
            enc = self.encoder.encode([e.text for e in batch])
            z = self.backend.forward(enc.input_ids, enc.attention_mask, keep=False)
            yield Step(z, enc.attention_mask, self._labels(batch, enc.input_ids, enc.attention_mask))

    @staticmethod
    def score(task: str, logits: np.ndarray, labels: np.ndarray) -> Score:
        """What one eval batch's server answer scores (a causal LM: hits, tokens and summed NLL)."""
        if task == "causal_lm":  # the server answers [B, 3]: summed NLL, tokens, correct tokens
            return summed(logits)
        return cls_score(logits, labels)

    # -- persistence ---------------------------------------------------------------------------
    def save(self) -> None:
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"theta/{k}": v for k, v in self.backend.get_params().items()}
        if self.phi is not None:
            tensors.update({f"phi/{k}": v for k, v in self.phi.items()})
        if self._optimizer is not None:
            tensors.update({f"opt/{k}": v for k, v in self._optimizer.state_dict().items()})
        meta = {"layout_hash": self.bundle.manifest.layout_hash, "epoch": self.cursor.epoch, "position": self.cursor.position,
                "last_round": self.last_round, "optimizer": list(self._opt_key) if self._opt_key else None}
        write_device_state(self.state_dir / _STATE_FILE, self.state_dir / _META_FILE, tensors, meta)

    def _restore(self) -> None:
        from safetensors.numpy import load_file

        assert self.state_dir is not None
        path, meta_path = self.state_dir / _STATE_FILE, self.state_dir / _META_FILE
        if not (path.exists() and meta_path.exists()):
            return
        todo = f"move {self.state_dir} aside to start this device's personal head afresh"
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{meta_path}: unreadable personal state ({type(e).__name__}: {e}); {todo}") from None
        if not isinstance(meta, dict) or not all(type(meta.get(k)) is int and meta[k] >= -1
                                                 for k in ("epoch", "position", "last_round")):
            raise ConfigError(f"{meta_path}: personal state metadata lacks integer epoch/position/last_round; {todo}")
        if meta.get("layout_hash") != self.bundle.manifest.layout_hash:
            log.warning("%s holds a personal head for another bundle layout; starting fresh", self.state_dir)
            return
        try:
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises SafetensorError, OSError, ValueError
            raise ConfigError(f"{path}: unreadable personal state ({e}); {todo}") from None
        bad = sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
        if bad or not any(k.startswith("theta/") for k in tensors):
            what = f"non-finite values in {bad[0]}" if bad else "no theta/ tensors"
            raise ConfigError(f"{path}: personal state has {what}; {todo}")
        self.backend.set_params({k[6:]: v for k, v in tensors.items() if k.startswith("theta/")})
        phi = {k[4:]: v for k, v in tensors.items() if k.startswith("phi/")}
        self.phi = phi or None
        if meta.get("optimizer"):
            name, lr = meta["optimizer"]
            self._optimizer = make_optimizer(name, lr=lr)
            self._optimizer.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("opt/")})
            self._opt_key = (name, lr)
        self.cursor = BatchCursor(self.train_set, self.seed, meta["epoch"], meta["position"])
        self.last_round = meta["last_round"]
        self.has_personal = True
        log.info("restored the personal head from %s (after round %d)", path, self.last_round)

    # -- internals -----------------------------------------------------------------------------
    def _next_batch(self, size: int) -> list[Example]:
        """The next local batch (a subclass may have drawn it ahead of time)."""
        return self.cursor.next(size)

    def _require_round(self) -> RoundSettings:
        if self.settings is None:
            raise ConfigError("no round in progress: call begin_round() first")
        return self.settings

    def _labels(self, batch: list[Example], input_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if self.task == "causal_lm":  # next-token prediction on the text itself; padding and prompts ignored
            return self.encoder.lm_labels(TokenBatch(input_ids, mask), [e.prompt for e in batch])
        return np.array([e.label for e in batch], dtype=np.int64)
