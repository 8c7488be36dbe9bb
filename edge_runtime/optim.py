"""Optimizers for the personal adapters, in numpy, with ``torch.optim``'s exact update rules.

The on-device programs return gradients; the update runs here, so every backend offers both SGD
and AdamW (ExecuTorch's own training API offers SGD only) and a device needs no torch. The
arithmetic follows ``torch.optim.SGD`` and ``torch.optim.AdamW`` (single-tensor, float32, same
order of operations), so a step matches PyTorch to float32 rounding.

    opt = make_optimizer("adamw", lr=1e-3)
    opt.step(params, grads)          # params: name -> float32 array, updated in place
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

from .errors import ConfigError

__all__ = ["Optimizer", "SGD", "AdamW", "make_optimizer"]


class Optimizer:
    """Updates a dict of float32 arrays in place from a dict of gradients with the same names."""

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        missing = [n for n in params if n not in grads]
        if missing:
            raise ConfigError(f"optimizer step: no gradient for {missing[0]!r}")
        for n, p in params.items():
            g = np.asarray(grads[n], dtype=np.float32)
            if g.shape != p.shape:
                raise ConfigError(f"optimizer step: gradient of {n!r} has shape {g.shape}, the tensor {p.shape}")
            self._update(n, p, g)
        self._after_step()

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        raise NotImplementedError

    def _after_step(self) -> None:
        pass

    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only (for safetensors); keys are ``"<kind>/<param name>"``."""
        raise NotImplementedError

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        raise NotImplementedError


class SGD(Optimizer):
    """``torch.optim.SGD``: momentum (with dampening), weight decay, Nesterov."""

    def __init__(self, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        if not lr > 0:
            raise ConfigError(f"SGD lr must be > 0, got {lr}")
        if momentum < 0 or weight_decay < 0:
            raise ConfigError("SGD momentum and weight_decay must be >= 0")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("SGD nesterov needs momentum > 0 and dampening 0")
        self.lr, self.momentum, self.dampening, self.weight_decay, self.nesterov = lr, momentum, dampening, weight_decay, nesterov
        self.buf: dict[str, np.ndarray] = {}

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        d = g + np.float32(self.weight_decay) * p if self.weight_decay else g
        if self.momentum:
            b = self.buf.get(name)
            if b is None:
                b = self.buf[name] = d.astype(np.float32, copy=True)
            else:
                b *= np.float32(self.momentum)
                b += np.float32(1 - self.dampening) * d
            d = d + np.float32(self.momentum) * b if self.nesterov else b
        p -= np.float32(self.lr) * d

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"momentum/{n}": b for n, b in self.buf.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.buf = {k.split("/", 1)[1]: np.array(v, dtype=np.float32) for k, v in state.items() if k.startswith("momentum/")}


class AdamW(Optimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, bias correction)."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0) -> None:
        if not lr > 0:
            raise ConfigError(f"AdamW lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps <= 0 or weight_decay < 0:
            raise ConfigError(f"AdamW needs 0 <= betas < 1, eps > 0 and weight_decay >= 0 (got {betas}, {eps}, {weight_decay})")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        self.t += 1
        super().step(params, grads)

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        b1, b2 = self.betas
        m = self.m.setdefault(name, np.zeros_like(p))
        v = self.v.setdefault(name, np.zeros_like(p))
        if self.weight_decay:
            p *= np.float32(1 - self.lr * self.weight_decay)
        m += (g - m) * np.float32(1 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= np.float32(b2)
        v += np.float32(1 - b2) * g * g
        bc1 = 1 - b1 ** self.t
        bc2 = 1 - b2 ** self.t
        denom = np.sqrt(v) / np.float32(math.sqrt(bc2)) + np.float32(self.eps)
        p -= np.float32(self.lr / bc1) * (m / denom)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"m/{n}": a for n, a in self.m.items()}
        out.update({f"v/{n}": a for n, a in self.v.items()})
        out["step/t"] = np.array([self.t], dtype=np.int64)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        self.m = {k[2:]: np.array(v, dtype=np.float32) for k, v in state.items() if k.startswith("m/")}
        self.v = {k[2:]: np.array(v, dtype=np.float32) for k, v in state.items() if k.startswith("v/")}
        self.t = int(np.asarray(state.get("step/t", [0]))[0])


def make_optimizer(name: str, *, lr: float, **kw) -> Optimizer:
    """``"sgd"`` or ``"adamw"`` with torch's defaults (weight decay 0 for both)."""
    if name == "sgd":
        return SGD(lr, **kw)
    if name == "adamw":
        return AdamW(lr, **kw)
    raise ConfigError(f"unknown optimizer {name!r}; use sgd or adamw")
