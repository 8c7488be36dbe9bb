"""Device target profiles: what a bundle is built for and what flashing checks on the device."""

from __future__ import annotations

import dataclasses

from flexsfl.core.errors import ConfigError

__all__ = ["TargetProfile", "TARGETS", "get_target"]


@dataclasses.dataclass(frozen=True)
class TargetProfile:
    """A class of edge device. Numbers are the smallest common configuration of that device."""

    name: str
    arch: str  # `uname -m` on the device: x86_64 or aarch64
    cores: int  # CPU cores the runtime may use
    memory_mb: int  # RAM of the smallest common model of the device
    preferred_backend: str  # "ort" or "executorch"
    accelerator: str = "none"  # "none" or "cuda"
    min_python: tuple[int, int] = (3, 11)
    description: str = ""

    @property
    def ort_training_wheel(self) -> bool:
        """Whether PyPI has an onnxruntime-training wheel for this architecture."""
        return self.arch == "x86_64"

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["min_python"] = list(self.min_python)
        return d

    @classmethod
    def from_json(cls, d: dict) -> "TargetProfile":
        try:
            return cls(**{**d, "min_python": tuple(d.get("min_python", (3, 11)))})
        except TypeError as e:
            raise ConfigError(f"target profile: {e}; re-export the bundle with this flexsfl version") from None


TARGETS: dict[str, TargetProfile] = {
    t.name: t
    for t in (
        TargetProfile("generic-x86_64", "x86_64", 2, 4096, "ort", description="any x86-64 Linux box"),
        TargetProfile("rpi4", "aarch64", 4, 4096, "executorch", description="Raspberry Pi 4 (Cortex-A72)"),
        TargetProfile("rpi5", "aarch64", 4, 8192, "executorch", description="Raspberry Pi 5 (Cortex-A76)"),
        TargetProfile(
            "jetson-orin", "aarch64", 6, 8192, "executorch", accelerator="cuda",
            description="Jetson Orin Nano 8GB (Cortex-A78AE + Ampere GPU)",
        ),
    )
}


def get_target(name: str) -> TargetProfile:
    try:
        return TARGETS[name]
    except KeyError:
        raise ConfigError(f"unknown target {name!r}; choose one of: {', '.join(TARGETS)}") from None
