"""Whole-model training on the device, for the whole-model baselines (FedAvg-LoRA, local only,
FedPer, FedRep, Ditto).

These baselines put every block and the task head on the device, so there is no split and no
server compute: the client trains the full LoRA model on its data with eager PyTorch and uploads
its adapters and the task head. This needs torch (imported lazily); it exists so the baselines run
on the same engine, data and wire as FlexP-SFL. How a round's ``local_steps`` are spent is the
round's ``local_rule`` (:data:`~flexsfl.core.constants.LOCAL_RULES`):

- ``plain``: every step trains every tensor (FedAvg, FedPer, local only).
- ``fedrep`` (Collins et al. 2021): steps ``[0, head_steps)`` train the task head alone (the body
  frozen: no gradient flows into it), steps ``[head_steps, local_steps)`` the body alone (the head
  frozen). The head — every tensor past the last block — is the client's own; the body is sent.
- ``ditto`` (Li et al. 2021): ``local_steps`` on the global model ``w`` sent this round, as FedAvg
  (``w_k`` is what :meth:`~FullModelTrainer.upload` sends), then ``local_steps`` on the client's
  personal model ``v_k`` (the first round's ``w`` at the start, kept across rounds) with the gradient
  ``∇L(v_k) + prox_mu · (v_k − w)`` (:func:`proximal_grad_`); ``evaluate`` scores ``v_k``. A Ditto
  round is ``2 · local_steps`` device steps, and ``stats.steps`` says so (the device clock charges them).

**Optimizer state**, the same rule for every strategy and for the split devices
(:class:`~flexsfl.edge_runtime.trainer.HeadTrainer`): a tensor's optimizer state belongs to the
weights it was built on. It is reset when the server replaces that tensor (FedAvg and SplitFed
every round; FedPer/FedRep for the body only; Ditto's ``w`` every round) and kept while the client
continues its own weights (FlexP-SFL's personal head, FedPer/FedRep's head, Ditto's ``v_k``, local
only). FlexP-SFL's and SplitFed's numerics are unchanged by it; FedAvg's clients used to keep AdamW
moments across rounds while their weights were replaced.

**State across restarts**, as the split device's (:meth:`~flexsfl.edge_runtime.trainer.HeadTrainer.save`):
with a ``state_dir`` every :meth:`~FullModelTrainer.end_round` writes the device's model, Ditto's
``v_k``, both optimizers' state and the data cursor (``full.safetensors`` + ``full.json``), and a new
trainer on that directory resumes from them: a device that restarts (or a client process started
again) keeps its own model — local only's, FedPer/FedRep's head, Ditto's ``v_k`` — instead of
starting over from the next global model. A reconnect within one process keeps the trainer itself.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import time
from typing import Mapping, Sequence

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import ConfigError
from flexsfl.core.scoring import Score, cls_score, lm_score
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.edge_runtime.trainer import BatchCursor, RoundSettings, RoundStats, write_device_state

__all__ = ["FullModelTrainer", "proximal_grad_"]

log = logging.getLogger("flexsfl.sim.full_trainer")

_STATE_FILE = "full.safetensors"
_META_FILE = "full.json"


def proximal_grad_(params, reference, mu: float) -> None:
    """Ditto's personal-model gradient, in place: ``p.grad += mu · (p − reference[n])`` for every
    ``(n, p)`` of ``params`` (name -> torch parameter whose ``grad`` holds ``∇L``); the gradient of
    ``L(v) + mu/2 ‖v − w‖²``."""
    import torch

    with torch.no_grad():
        for n, p in params.items():
            if p.grad is not None:
                p.grad.add_(p.detach() - reference[n], alpha=mu)


class FullModelTrainer:
    """Trains the whole model (all adapters and the task head) locally with torch."""

    backend_name = "torch-full"
    whole_model = True

    def __init__(self, bundle: Bundle, train: Sequence[Example], test: Sequence[Example] = (), *, seed: int = 0,
                 threads: int | None = None, state_dir: str | os.PathLike | None = None) -> None:
        import torch

        from flexsfl.model.loading import LoraSettings, load_model
        from flexsfl.model.partition import block_of, canonical_names

        if threads:
            torch.set_num_threads(threads)
        m = bundle.manifest
        self.bundle = bundle
        self.task = m.model.task
        self.encoder = TextEncoder.from_bundle(bundle)
        lora = LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules)
        self.loaded = load_model(m.model.id, task=m.model.task, num_labels=m.model.num_labels, lora=lora,
                                 seed=int(m.extra.get("seed", 0)), attn_implementation="sdpa")
        names = canonical_names(self.loaded.model)
        self.params = {names[id(p)]: p for p in self.loaded.model.parameters() if p.requires_grad}
        L = self.loaded.info.num_blocks
        self.head_names = {n for n in self.params if block_of(n, L) == L}  # the task head: FedPer/FedRep's own
        self.train_set, self.test_set = list(train), list(test)
        self.cursor = BatchCursor(self.train_set, seed)
        self.settings: RoundSettings | None = None
        self.stats = RoundStats()
        self._opt: dict[str, object] = {}  # "w": the model the device uploads; "v": Ditto's personal model
        self._opt_key = None
        self._started = False
        self._ref: dict | None = None  # Ditto: the round's global model w (torch tensors)
        self._personal: dict | None = None  # Ditto: v_k between rounds
        self._upload: dict[str, np.ndarray] | None = None  # Ditto: w_k after the round's global steps
        self._upload_samples = 0
        self.seed = seed
        self.last_round = -1
        self.state_dir = pathlib.Path(state_dir) if state_dir else None
        if self.state_dir is not None:
            self._restore()

    def begin_round(self, settings: RoundSettings, adapters: Mapping[str, np.ndarray] | None) -> None:
        """Start a round: take what the server sent (see the module for which tensors, and their
        optimizer state), and set up the optimizers."""
        import torch

        self.settings = settings
        self._optimizers(settings.optimizer, settings.lr)
        if adapters is not None and (not self._started or not settings.personal):
            with torch.no_grad():
                for n, a in adapters.items():
                    self.params[n].copy_(torch.as_tensor(np.array(a, dtype=np.float32)))  # a copy: wire arrays are read-only
                    self._opt["w"].state.pop(self.params[n], None)  # replaced weights: fresh optimizer state
            self._started = True
        if settings.local_rule == "ditto":
            if adapters is None:
                raise ConfigError("the server sent a Ditto round without the global model (its proximal reference): "
                                  "run the server and this client from the same flexsfl version")
            self._ref = {n: p.detach().clone() for n, p in self.params.items()}
            if self._personal is None:
                self._personal = {n: t.clone() for n, t in self._ref.items()}  # v_k starts at the first global model
        self._upload = None
        self.stats = RoundStats()

    def train_local(self) -> None:
        """The round's local steps on local batches, entirely on the device (see the module)."""
        s = self.settings
        assert s is not None, "begin_round() first"
        if s.local_rule == "fedrep":
            if not 0 <= s.head_steps <= s.local_steps:
                raise ConfigError(f"the server asks for {s.head_steps} FedRep head steps in a round of {s.local_steps}: "
                                  "lower --fedrep-head-steps below --local-steps")
            self._steps(s.head_steps, "w", trainable=self.head_names)
            self._steps(s.local_steps - s.head_steps, "w", trainable=set(self.params) - self.head_names)
        elif s.local_rule == "ditto":
            self._steps(s.local_steps, "w")
            self._upload = {n: p.detach().numpy().copy() for n, p in self.params.items()}
            self._upload_samples = self.stats.samples
            self._load(self._personal)
            self._steps(s.local_steps, "v", prox_mu=s.prox_mu)
            self._personal = {n: p.detach().clone() for n, p in self.params.items()}  # the device now holds v_k
        else:
            self._steps(s.local_steps, "w")

    def _steps(self, n: int, role: str, *, trainable: set[str] | None = None, prox_mu: float | None = None) -> None:
        """``n`` optimizer steps of ``self._opt[role]``: only ``trainable`` tensors (default all)
        get a gradient; with ``prox_mu``, Ditto's proximal term against the round's global model."""
        import torch

        from flexsfl.model.partition import task_loss

        s, model, opt = self.settings, self.loaded.model, self._opt[role]
        for name, p in self.params.items():
            p.requires_grad_(trainable is None or name in trainable)
        try:
            for _ in range(n):
                batch = self.cursor.next(s.batch_size)
                enc = self.encoder.encode([e.text for e in batch])
                ids, mask = torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)
                if self.task == "causal_lm":  # padding and instruction prompts are never predicted, as on a split device
                    labels = torch.from_numpy(self.encoder.lm_labels(enc, [e.prompt for e in batch]))
                else:
                    labels = torch.tensor([e.label for e in batch])
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)  # frozen tensors keep grad None: the optimizer skips them
                loss = task_loss(model(input_ids=ids, attention_mask=mask).logits, labels, self.task)
                loss.backward()
                if prox_mu:
                    proximal_grad_(self.params, self._ref, prox_mu)
                opt.step()
                self.stats.backward_s += time.perf_counter() - t0
                self.stats.steps += 1
                self.stats.samples += len(batch)
                self.stats.loss_sum += loss.item()
        finally:
            for p in self.params.values():
                p.requires_grad_(True)

    def _load(self, values) -> None:
        import torch

        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(values[n])

    def upload(self) -> tuple[dict[str, np.ndarray], int]:
        """Every trainable tensor (Ditto: of ``w_k``, not the personal ``v_k``) and the samples it trained on."""
        if self._upload is not None:
            return self._upload, max(self._upload_samples, 1)
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}, max(self.stats.samples, 1)

    def end_round(self) -> None:
        """The round is aggregated: with a ``state_dir``, persist the device's state (see the module)."""
        if self.settings is not None:
            self.last_round = self.settings.round_id
        self.settings = None
        if self.state_dir is not None:
            self.save()

    def _optimizers(self, name: str, lr: float) -> None:
        """One optimizer per role (``w``: the model the device uploads; ``v``: Ditto's personal model), rebuilt
        (fresh state) when the server changes the optimizer or its learning rate."""
        import torch

        if (name, lr) != self._opt_key:
            cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
            self._opt = {role: cls(list(self.params.values()), lr=lr) for role in ("w", "v")}
            self._opt_key = (name, lr)

    # -- persistence ---------------------------------------------------------------------------
    def save(self) -> None:
        """Write the device's model, Ditto's ``v_k``, the optimizers' state and the data cursor to ``state_dir``."""
        assert self.state_dir is not None
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tensors = {f"model/{n}": p.detach().numpy().copy() for n, p in self.params.items()}
        if self._personal is not None:
            tensors.update({f"v/{n}": t.numpy().copy() for n, t in self._personal.items()})
        scalars = []
        by_param = {id(p): n for n, p in self.params.items()}
        for role, opt in self._opt.items():
            for p, st in opt.state.items():
                for k, v in st.items():
                    key = f"opt/{role}/{k}/{by_param[id(p)]}"
                    a = v.detach().numpy() if hasattr(v, "detach") else np.asarray(v, dtype=np.float32)
                    if a.ndim == 0:
                        scalars.append(key)
                    tensors[key] = np.atleast_1d(a).copy()
        meta = {"layout_hash": self.bundle.manifest.layout_hash, "epoch": self.cursor.epoch,
                "position": self.cursor.position, "last_round": self.last_round, "started": self._started,
                "optimizer": list(self._opt_key) if self._opt_key else None, "scalars": scalars}
        write_device_state(self.state_dir / _STATE_FILE, self.state_dir / _META_FILE, tensors, meta)

    def _restore(self) -> None:
        import torch
        from safetensors.numpy import load_file

        assert self.state_dir is not None
        path, meta_path = self.state_dir / _STATE_FILE, self.state_dir / _META_FILE
        if not (path.exists() and meta_path.exists()):
            return
        todo = f"move {self.state_dir} aside to start this device's model afresh"
        try:
            meta = json.loads(meta_path.read_text())
            tensors = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - json, OSError, safetensors' SafetensorError
            raise ConfigError(f"{self.state_dir}: unreadable device state ({type(e).__name__}: {e}); {todo}") from None
        if not isinstance(meta, dict) or not all(type(meta.get(k)) is int for k in ("epoch", "position", "last_round")):
            raise ConfigError(f"{meta_path}: device state metadata lacks integer epoch/position/last_round; {todo}")
        if meta.get("layout_hash") != self.bundle.manifest.layout_hash:
            log.warning("%s holds a model for another bundle layout; starting fresh", self.state_dir)
            return
        model = {k[6:]: v for k, v in tensors.items() if k.startswith("model/")}
        bad = sorted(set(self.params) ^ set(model)) or sorted(k for k, v in tensors.items() if not np.isfinite(v).all())
        if bad:
            raise ConfigError(f"{path}: device state does not fit this bundle's model or is not finite ({bad[0]!r}); {todo}")
        self._load({n: torch.from_numpy(a) for n, a in model.items()})
        v = {k[2:]: torch.from_numpy(a) for k, a in tensors.items() if k.startswith("v/")}
        self._personal = v or None
        if meta.get("optimizer"):
            name, lr = meta["optimizer"]
            self._optimizers(name, lr)
            scalars = set(meta.get("scalars", ()))
            for key, a in tensors.items():
                if key.startswith("opt/"):
                    _, role, k, n = key.split("/", 3)
                    t = torch.from_numpy(a.copy())
                    self._opt[role].state[self.params[n]][k] = t.reshape(()) if key in scalars else t
        self.cursor = BatchCursor(self.train_set, self.seed, meta["epoch"], meta["position"])
        self.last_round, self._started = meta["last_round"], bool(meta.get("started"))
        log.info("restored the device's model from %s (after round %d)", path, self.last_round)

    def evaluate(self) -> Score:
        """What this device's model (Ditto: ``v_k``) scores on its local test split (a causal LM: next-token
        hits over real tokens and their summed NLL, as the split devices report them)."""
        import torch

        correct = total = 0
        nll = 0.0
        with torch.no_grad():
            for i in range(0, len(self.test_set), 64):
                chunk = self.test_set[i : i + 64]
                enc = self.encoder.encode([e.text for e in chunk])
                logits = self.loaded.model(input_ids=torch.from_numpy(enc.input_ids),
                                           attention_mask=torch.from_numpy(enc.attention_mask)).logits
                if self.task == "causal_lm":
                    s = lm_score(logits.numpy(), self.encoder.lm_labels(enc, [e.prompt for e in chunk]))
                else:
                    s = cls_score(logits.numpy(), np.array([e.label for e in chunk]))
                correct, total, nll = correct + s.correct, total + s.counted, nll + s.nll
        return Score(correct, total, nll)
