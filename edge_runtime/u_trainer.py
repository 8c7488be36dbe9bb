"""The device's training logic in the U-shaped topology: a personal head *and* a personal top; no I/O.

A bundle exported with ``--top U`` holds the head's programs and the top's (``top_train`` /
``top_eval``, :mod:`.top`). The device keeps its labels: the server only ever sees ``Z`` and
``dL/dH``. One step::

    step = trainer.forward()              # Z = head(x; θ_head); step.labels is None: they stay here
    ... send Z and the mask; receive H ...
    grad_h, loss = trainer.top_step(h)    # loss, dL/dH from the top with the local labels; θ_top steps
    ... send dL/dH and the loss; receive g = dL/dZ ...
    trainer.backward(g, loss)             # as HeadTrainer: G = g (+ alignment); θ_head steps

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
    """:class:`RoundStats` plus the top's step time (counted in ``client_compute_ms`` too)."""

    top_s: float = 0.0

    def compute_s(self) -> float:
        return super().compute_s() + self.top_s

    def as_metrics(self) -> dict[str, float | int]:
        out = super().as_metrics()
        n = max(self.steps, 1)
        out["top_ms"] = 1e3 * self.top_s / n
        out["client_compute_ms"] += out["top_ms"]
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
        self.stats = URoundStats()

    def forward(self) -> Step:
        """Next local batch -> Z; the batch's labels stay in the trainer (``Step.labels`` is None)."""
        step = super().forward()
        self._labels_pending = step.labels
        return dataclasses.replace(step, labels=None)

    def top_step(self, h: np.ndarray) -> tuple[np.ndarray, float]:
        """The top's fused step on the server's ``H`` for the pending batch: returns ``(dL/dH, loss)``
        and steps θ_top. A bad ``H`` is a one-line ConfigError and changes nothing."""
        self._require_round()
        if self._pending is None or self._labels_pending is None or self._h_pending:
            raise ConfigError("top_step() needs a forward() and one H per step")
        _, _, mask = self._pending
        t0 = time.perf_counter()
        out = self.top.train_step(h, mask, self._labels_pending)
        self._top_opt.step(self.top.params, out.grads)
        self.stats.top_s += time.perf_counter() - t0
        self._h_pending = True
        return out.grad_h, out.loss

    def backward(self, g: np.ndarray, loss: float) -> None:
        if not self._h_pending:
            raise ConfigError("backward() before top_step(): a U-shaped step needs H first")
        super().backward(g, loss)
        self._h_pending = False
        self._labels_pending = None

    def upload(self) -> tuple[dict[str, np.ndarray], int]:
        """θ_head and θ_top by canonical name, and the samples behind them."""
        params, n = super().upload()
        return {**params, **self.top.get_params()}, n

    # -- evaluation ----------------------------------------------------------------------------
    def score_top(self, h: np.ndarray, step: Step) -> tuple[int, int]:
        """(correct, counted) of the personal top's predictions for ``H`` of an eval batch, here on
        the device: classes for classification, next tokens (labels not -100) for a causal LM."""
        logits = self.top.predict(h, step.attention_mask)
        y = step.labels
        if self.task == "causal_lm":
            pred, target = logits[:, :-1].argmax(-1), y[:, 1:]
            keep = target != -100
            return int((keep & (pred == target)).sum()), int(keep.sum())
        return int((logits.argmax(-1) == y).sum()), int(y.shape[0])

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
