"""A device's resources as split selection sees them: the profile schema, strict to read.

A :class:`DeviceProfile` is what the planner (:mod:`flexsfl.core.planner`) plans with and what a
client reports in its ``Hello``; :mod:`flexsfl.edge_runtime.probe` measures one on the device.
Profiles are JSON objects of flat scalars; a value that is not known is left out rather than
written as ``null``. Reading one is strict: an unknown or missing field, or a value of the wrong
type or range, is a one-line :class:`ConfigError` naming it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import pathlib
from typing import Any, Callable, Mapping

from flexsfl.core.atomic import atomic_write_text
from flexsfl.core.errors import ConfigError

__all__ = ["ACCELERATORS", "DeviceProfile", "read_profile", "write_profile"]

ACCELERATORS = ("none", "cuda")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive_number(v: Any) -> bool:
    return _number(v) and v > 0


def _text(v: Any) -> bool:
    return isinstance(v, str)


# field -> (check, what the field must be); optional fields also accept None (= not known).
_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "name": (lambda v: _text(v) and bool(v.strip()), "a non-empty string"),
    "arch": (lambda v: _text(v) and bool(v), "a non-empty string such as aarch64 or x86_64"),
    "cores": (lambda v: _is_int(v) and v >= 1, "an int >= 1"),
    "memory_mb": (lambda v: _is_int(v) and v >= 1, "an int >= 1 (MB of RAM)"),
    "memory_budget_mb": (lambda v: _is_int(v) and v >= 1, "an int >= 1 (MB training may use)"),
    "head_gflops": (_positive_number, "a number > 0 (GFLOP/s) or absent"),
    "uplink_mbps": (_positive_number, "a number > 0 (Mbit/s) or absent"),
    "downlink_mbps": (_positive_number, "a number > 0 (Mbit/s) or absent"),
    "rtt_ms": (lambda v: _number(v) and v >= 0, "a number >= 0 (ms) or absent"),
    "device_model": (_text, "a string"),
    "cpu_model": (_text, "a string"),
    "accelerator": (lambda v: v in ACCELERATORS, f"one of {', '.join(ACCELERATORS)}"),
    "backend": (_text, "a string (the runtime head_gflops was measured with)"),
}
_OPTIONAL = {"head_gflops", "uplink_mbps", "downlink_mbps", "rtt_ms"}


@dataclasses.dataclass(frozen=True)
class DeviceProfile:
    """One device's resources. Sizes in MB (10^6 bytes), bandwidths in Mbit/s, None = not known."""

    name: str  # a label for the device; the hostname by default
    arch: str  # `uname -m`: aarch64, x86_64
    cores: int  # CPUs this process may run on
    memory_mb: int  # physical RAM (MemTotal)
    memory_budget_mb: int  # what training may use (weights, activations, runtime), <= memory_mb
    head_gflops: float | None = None  # achieved GFLOP/s of one head step (forward + backward) with `backend`
    uplink_mbps: float | None = None  # device -> server
    downlink_mbps: float | None = None  # server -> device
    rtt_ms: float | None = None  # round-trip time to the server
    device_model: str = ""  # board ("Raspberry Pi 4 Model B Rev 1.4") or system product name
    cpu_model: str = ""  # "ARM Cortex-A72", "Intel(R) Xeon(R) ..."
    accelerator: str = "none"  # "none" or "cuda" (Jetson, NVIDIA GPU)
    backend: str = ""  # runtime that measured head_gflops: "ort", "executorch", "torch"

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in _OPTIONAL:
                continue
            check, what = _CHECKS[f.name]
            if not check(v):
                raise ConfigError(f"device profile: field {f.name!r} must be {what}, got {v!r}")
        if self.memory_budget_mb > self.memory_mb:
            raise ConfigError(
                f"device profile: field 'memory_budget_mb' ({self.memory_budget_mb}) exceeds 'memory_mb' "
                f"({self.memory_mb}); lower the budget"
            )

    def to_json(self) -> dict[str, Any]:
        """A flat JSON object; unknown (None) values are left out."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, d: Any, *, where: str = "device profile") -> "DeviceProfile":
        """Strict inverse of :meth:`to_json`; every error is one line naming ``where`` and the field."""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{where}: must be a JSON object, got {type(d).__name__}")
        known = [f.name for f in dataclasses.fields(cls)]
        for k in d:
            if k not in known:
                raise ConfigError(f"{where}: unknown field {k!r}; known fields: {', '.join(known)}")
        for f in dataclasses.fields(cls):
            if f.name not in d and f.default is dataclasses.MISSING:
                raise ConfigError(f"{where}: missing field {f.name!r}; write it with `flexsfl edge probe --json FILE`")
        try:
            return cls(**d)
        except ConfigError as e:
            raise ConfigError(str(e).replace("device profile", where, 1)) from None


def read_profile(path: str | os.PathLike) -> DeviceProfile:
    """Load a profile written by ``flexsfl edge probe --json``."""
    p = pathlib.Path(path)
    try:
        raw = p.read_text()
    except OSError as e:
        raise ConfigError(
            f"{p}: cannot read the device profile ({e.strerror}); write one with `flexsfl edge probe --json`"
        ) from None
    try:
        data = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"{p}: not valid JSON ({e}); write it with `flexsfl edge probe --json`") from None
    return DeviceProfile.from_json(data, where=str(p))


def write_profile(profile: DeviceProfile, path: str | os.PathLike) -> None:
    """Write sorted, indented JSON atomically (a temporary name, then a rename)."""
    atomic_write_text(path, json.dumps(profile.to_json(), indent=2, sort_keys=True) + "\n")
