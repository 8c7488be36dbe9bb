"""Whole-model training on the device, for the FedAvg-LoRA and local-only baselines.

These baselines put every block and the task head on the device, so there is no split and no
server compute: the client trains the full LoRA model on its data with eager PyTorch and uploads
all of its adapters and the task head. This needs torch (imported lazily); it exists so the
baselines run on the same engine, data and wire as FlexP-SFL.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.edge_runtime.data import Example
from flexsfl.edge_runtime.text import TextEncoder
from flexsfl.edge_runtime.trainer import BatchCursor, RoundSettings, RoundStats

__all__ = ["FullModelTrainer"]


class FullModelTrainer:
    """Trains the whole model (all adapters and the task head) locally with torch."""

    backend_name = "torch-full"
    whole_model = True

    def __init__(self, bundle: Bundle, train: Sequence[Example], test: Sequence[Example] = (), *, seed: int = 0,
                 threads: int | None = None) -> None:
        import torch

        from flexsfl.model.loading import LoraSettings, load_model
        from flexsfl.model.partition import canonical_names

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
        self.train_set, self.test_set = list(train), list(test)
        self.cursor = BatchCursor(self.train_set, seed)
        self.settings: RoundSettings | None = None
        self.stats = RoundStats()
        self._opt = None
        self._opt_key = None

    def begin_round(self, settings: RoundSettings, adapters: Mapping[str, np.ndarray] | None) -> None:
        import torch

        self.settings = settings
        if adapters is not None and (self._opt is None or not settings.personal):
            with torch.no_grad():
                for n, a in adapters.items():
                    self.params[n].copy_(torch.from_numpy(np.asarray(a, dtype=np.float32)))
        key = (settings.optimizer, settings.lr)
        if self._opt is None or key != self._opt_key:
            cls = torch.optim.SGD if settings.optimizer == "sgd" else torch.optim.AdamW
            self._opt, self._opt_key = cls(list(self.params.values()), lr=settings.lr), key
        self.stats = RoundStats()

    def train_local(self) -> None:
        """The round's ``local_steps`` steps on local batches, entirely on the device."""
        import torch

        from flexsfl.model.partition import task_loss

        s = self.settings
        assert s is not None, "begin_round() first"
        model = self.loaded.model
        for _ in range(s.local_steps):
            batch = self.cursor.next(s.batch_size)
            enc = self.encoder.encode([e.text for e in batch])
            ids, mask = torch.from_numpy(enc.input_ids), torch.from_numpy(enc.attention_mask)
            if self.task == "causal_lm":
                labels = torch.where(mask == 1, ids, -100)
            else:
                labels = torch.tensor([e.label for e in batch])
            t0 = time.perf_counter()
            self._opt.zero_grad(set_to_none=True)
            loss = task_loss(model(input_ids=ids, attention_mask=mask).logits, labels, self.task)
            loss.backward()
            self._opt.step()
            self.stats.backward_s += time.perf_counter() - t0
            self.stats.steps += 1
            self.stats.samples += len(batch)
            self.stats.loss_sum += loss.item()

    def upload(self) -> tuple[dict[str, np.ndarray], int]:
        return {n: p.detach().numpy().copy() for n, p in self.params.items()}, max(self.stats.samples, 1)

    def end_round(self) -> None:
        self.settings = None

    def evaluate(self) -> tuple[int, int]:
        """(correct, total) of this device's model on its local test split."""
        import torch

        correct = total = 0
        with torch.no_grad():
            for i in range(0, len(self.test_set), 64):
                chunk = self.test_set[i : i + 64]
                enc = self.encoder.encode([e.text for e in chunk])
                logits = self.loaded.model(input_ids=torch.from_numpy(enc.input_ids),
                                           attention_mask=torch.from_numpy(enc.attention_mask)).logits
                if self.task == "causal_lm":  # next-token accuracy over real tokens, as the split devices report it
                    target = np.where(enc.attention_mask == 1, enc.input_ids, -100)[:, 1:]
                    hit = (logits[:, :-1].argmax(-1).numpy() == target) & (target != -100)
                    correct += int(hit.sum())
                    total += int((target != -100).sum())
                    continue
                correct += int((logits.argmax(-1).numpy() == np.array([e.label for e in chunk])).sum())
                total += len(chunk)
        return correct, total
