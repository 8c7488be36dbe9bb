"""Optimizers for the personal adapters, in numpy, with ``torch.optim``'s exact update rules.

The on-device programs return gradients; the update runs here, so every backend offers both SGD
and AdamW (ExecuTorch's own training API offers SGD only) and a device needs no torch. The
arithmetic follows ``torch.optim.SGD`` and ``torch.optim.AdamW`` on CPU (the single-tensor
path, float32, same order of operations), so a step matches PyTorch to float32 rounding
(torch fuses ``a + alpha*b`` into one FMA where numpy rounds twice: <= 1 ulp per step).

    opt = make_optimizer("adamw", lr=1e-3)
    opt.step(params, grads)          # params: name -> float32 array, updated in place

State (momentum buffers, Adam moments, step count) is a flat dict of numpy arrays, so an
on-device checkpoint is one safetensors file.
"""

from __future__ import annotations

import abc
import math
from typing import Mapping

import numpy as np

from flexsfl.core.errors import ConfigError

__all__ = ["Optimizer", "SGD", "AdamW", "make_optimizer"]


class Optimizer(abc.ABC):
    """Updates a dict of float32 arrays in place from a dict of gradients with the same names."""

    def step(self, params: dict[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> None:
        """One update of every tensor in ``params``; checks everything before changing anything."""
        checked = {}
        for n, p in params.items():
            if n not in grads:
                raise ConfigError(f"optimizer step: no gradient for {n!r}")
            g = np.asarray(grads[n], dtype=np.float32)
            if g.shape != p.shape:
                raise ConfigError(f"optimizer step: gradient of {n!r} has shape {list(g.shape)}, the tensor {list(p.shape)}")
            if p.dtype != np.float32 or not p.flags.writeable:
                raise ConfigError(f"optimizer step: {n!r} must be a writable float32 array (it is updated in place)")
            checked[n] = g
        self._begin_step()
        for n, g in checked.items():
            self._update(n, params[n], g)

    def _begin_step(self) -> None:
        """Hook before the tensors of one step are updated (AdamW counts steps here)."""

    @abc.abstractmethod
    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        """Update ``p`` in place from its gradient ``g`` (both float32, same shape)."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, np.ndarray]:
        """Arrays only (for safetensors); keys are ``"<kind>/<param name>"``."""

    @abc.abstractmethod
    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore what :meth:`state_dict` returned (arrays are copied)."""


def _kind(state: Mapping[str, np.ndarray], kind: str) -> dict[str, np.ndarray]:
    prefix = kind + "/"
    return {k[len(prefix):]: np.array(v, dtype=np.float32) for k, v in state.items() if k.startswith(prefix)}


def _check_keys(state: Mapping[str, np.ndarray], kinds: tuple[str, ...], who: str) -> None:
    bad = [k for k in state if k.split("/", 1)[0] not in kinds or "/" not in k]
    if bad:
        raise ConfigError(f"{who} state: unexpected key {bad[0]!r} (expected {', '.join(k + '/<name>' for k in kinds)}); "
                          "was it saved by another optimizer?")


class SGD(Optimizer):
    """``torch.optim.SGD``: momentum (with dampening), weight decay, Nesterov."""

    def __init__(self, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                 nesterov: bool = False) -> None:
        if not lr > 0:
            raise ConfigError(f"SGD lr must be > 0, got {lr}")
        if momentum < 0 or weight_decay < 0:
            raise ConfigError(f"SGD momentum and weight_decay must be >= 0 (got {momentum}, {weight_decay})")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ConfigError("SGD nesterov needs momentum > 0 and dampening 0")
        self.lr, self.momentum, self.dampening, self.weight_decay, self.nesterov = lr, momentum, dampening, weight_decay, nesterov
        self.buf: dict[str, np.ndarray] = {}

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        d = g + np.float32(self.weight_decay) * p if self.weight_decay else g
        if self.momentum:
            b = self.buf.get(name)
            if b is None:  # torch: the first buffer is a copy of the gradient, undamped
                b = self.buf[name] = d.astype(np.float32, copy=True)
            else:
                b *= np.float32(self.momentum)
                b += np.float32(1 - self.dampening) * d
            d = d + np.float32(self.momentum) * b if self.nesterov else b
        p -= np.float32(self.lr) * d

    def state_dict(self) -> dict[str, np.ndarray]:
        return {f"momentum/{n}": b.copy() for n, b in self.buf.items()}

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        _check_keys(state, ("momentum",), "SGD")
        self.buf = _kind(state, "momentum")


class AdamW(Optimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, bias correction), torch's defaults."""

    def __init__(self, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2) -> None:
        if not lr > 0:
            raise ConfigError(f"AdamW lr must be > 0, got {lr}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1) or eps <= 0 or weight_decay < 0:
            raise ConfigError(f"AdamW needs 0 <= betas < 1, eps > 0 and weight_decay >= 0 (got {betas}, {eps}, {weight_decay})")
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.t = 0
        self.m: dict[str, np.ndarray] = {}
        self.v: dict[str, np.ndarray] = {}

    def _begin_step(self) -> None:
        self.t += 1

    def _update(self, name: str, p: np.ndarray, g: np.ndarray) -> None:
        b1, b2 = self.betas
        m = self.m.setdefault(name, np.zeros_like(p))
        v = self.v.setdefault(name, np.zeros_like(p))
        if self.weight_decay:
            p *= np.float32(1 - self.lr * self.weight_decay)
        m += (g - m) * np.float32(1 - b1)  # torch: exp_avg.lerp_(grad, 1 - beta1)
        v *= np.float32(b2)
        v += np.float32(1 - b2) * g * g  # torch: addcmul_(grad, grad, value=1 - beta2)
        bc1 = 1 - b1**self.t
        bc2 = 1 - b2**self.t
        denom = np.sqrt(v) / np.float32(math.sqrt(bc2)) + np.float32(self.eps)
        p -= (np.float32(self.lr / bc1) * m) / denom  # torch: addcdiv_(m, denom, value=-lr/bc1)

    def state_dict(self) -> dict[str, np.ndarray]:
        out = {f"m/{n}": a.copy() for n, a in self.m.items()}
        out.update({f"v/{n}": a.copy() for n, a in self.v.items()})
        out["step/t"] = np.array([self.t], dtype=np.int64)
        return out

    def load_state_dict(self, state: Mapping[str, np.ndarray]) -> None:
        _check_keys(state, ("m", "v", "step"), "AdamW")
        m, v = _kind(state, "m"), _kind(state, "v")
        if set(m) != set(v) or any(m[n].shape != v[n].shape for n in m):
            raise ConfigError("AdamW state: first and second moments do not cover the same tensors")
        self.m, self.v = m, v
        self.t = int(np.asarray(state.get("step/t", [0])).reshape(-1)[0])


def make_optimizer(name: str, *, lr: float, **kw) -> Optimizer:
    """``"sgd"`` or ``"adamw"`` with torch's defaults (weight decay 0 for SGD, 0.01 for AdamW)."""
    if name == "sgd":
        return SGD(lr, **kw)
    if name == "adamw":
        return AdamW(lr, **kw)
    raise ConfigError(f"unknown optimizer {name!r}; use sgd or adamw")
