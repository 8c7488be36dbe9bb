"""Eager PyTorch: the reference backend for tests and benchmarks (needs torch and transformers).

It rebuilds the bundle's head from the model it was exported from (``manifest.model.id`` and the
export seed) and runs it in eager mode: ``forward`` keeps the autograd graph, ``backward`` is one
``torch.autograd.grad`` with ``grad_outputs=G`` — one forward and one backward per step, the cost
the on-device programs are measured against. Importing this module registers it as the
``torch`` backend of :func:`flexsfl.edge_runtime.backends.open_backend`.
"""

from __future__ import annotations

from typing import ClassVar, Mapping

import numpy as np

from flexsfl.core.bundle import Bundle
from flexsfl.core.errors import BackendError
from flexsfl.edge_runtime.backends import Backend, load_initial_params, register_backend
from flexsfl.edge_runtime.data import Example
from flexsfl.sim.full_trainer import FullModelTrainer

__all__ = ["TorchBackend", "full_model_trainer"]


class TorchBackend(Backend):
    name: ClassVar[str] = "torch"

    def __init__(self, bundle: Bundle, *, threads: int | None = None) -> None:
        try:
            import torch

            from flexsfl.model.loading import LoraSettings, load_model
            from flexsfl.model.partition import build_head
        except ImportError as e:
            raise BackendError(f"the torch backend needs torch and transformers ({e}); pip install 'flexsfl[server]'") from None
        if threads:
            torch.set_num_threads(threads)
        m = bundle.manifest
        self.bundle = bundle
        lora = LoraSettings(r=m.lora.r, alpha=m.lora.alpha, dropout=m.lora.dropout, target_modules=m.lora.target_modules)
        loaded = load_model(m.model.id, task=m.model.task, num_labels=m.model.num_labels, lora=lora,
                            seed=int(m.extra.get("seed", 0)), attn_implementation="eager")
        if loaded.info.revision != m.model.revision:
            raise BackendError(f"{m.model.id}: the local weights ({loaded.info.revision[:19]}) are not the ones the bundle "
                               f"was exported from ({m.model.revision[:19]}); re-export the bundle")
        self.head = build_head(loaded, m.split)
        own = self.head.canonical()  # own name -> canonical
        self._own = {c: n for n, c in own.items()}
        self.names = [p.name for p in m.trainable_parameters]
        missing = [n for n in self.names if n not in self._own]
        if missing:
            raise BackendError(f"the rebuilt head has no tensor {missing[0]!r}; the bundle and the model disagree")
        for p in self.head.parameters():
            p.requires_grad_(False)
        self.params = load_initial_params(bundle)
        self._torch = torch
        self._kept = None

    def forward(self, input_ids, attention_mask, *, params: Mapping[str, np.ndarray] | None = None, keep: bool = True):
        torch = self._torch
        src = self.params if params is None else params
        tensors = {self._own[n]: torch.tensor(np.asarray(src[n], dtype=np.float32), requires_grad=keep) for n in self.names}
        ids, mask = torch.from_numpy(np.asarray(input_ids, np.int64)), torch.from_numpy(np.asarray(attention_mask, np.int64))
        with torch.set_grad_enabled(keep):
            z = torch.func.functional_call(self.head, tensors, (ids, mask))
        if keep:
            self._kept = (z, [tensors[self._own[n]] for n in self.names])
        return z.detach().numpy()

    def backward(self, grad_z: np.ndarray) -> dict[str, np.ndarray]:
        if self._kept is None:
            raise BackendError("backward() without a kept forward(); call forward(..., keep=True) first")
        z, leaves = self._kept
        self._kept = None
        grads = self._torch.autograd.grad(z, leaves, grad_outputs=self._torch.from_numpy(np.asarray(grad_z, np.float32)))
        return {n: g.numpy() for n, g in zip(self.names, grads)}


register_backend(TorchBackend, reference=True)


def full_model_trainer(bundle: Bundle, train: list[Example], test: list[Example], cfg: dict) -> FullModelTrainer:
    """The trainer factory for ``flexsfl edge run --full-model`` (the whole-model baselines)."""
    return FullModelTrainer(bundle, train, test, seed=int(cfg.get("seed") or 0), threads=cfg.get("threads"),
                            state_dir=cfg.get("state_dir"))
