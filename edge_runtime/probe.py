"""What this device can give to training: memory, cores, board, and the measured speed of its head.

A :class:`DeviceProfile` is what split selection (:mod:`flexsfl.core.planner`) plans with and
what a client reports in its ``Hello``. ``flexsfl edge probe --bundle B`` (:mod:`flexsfl.cli.edge`)
builds one on the device: it reads the facts the kernel knows (``/proc/meminfo``, the CPUs this process may run
on, ``uname -m``, the board name from the device tree, NVIDIA's ``/etc/nv_tegra_release`` on a
Jetson, the CPU from ``/proc/cpuinfo``) and times forward + backward of the bundle's own head
with the real runtime (:func:`measure_head_throughput`), so ``head_gflops`` is what this device
achieves on this kind of work, not a datasheet peak. Network bandwidth cannot be measured
without a server, so the user states it (``--uplink-mbps``/``--downlink-mbps``).

Profiles are JSON objects of flat scalars (what ``Hello.profile`` carries); a value that is not
known is left out rather than written as ``null``. Reading one is strict: an unknown or missing
field, or a value of the wrong type or range, is a one-line :class:`ConfigError` naming it.

Nothing here imports torch; the backend being timed is whatever ``open_backend`` returns.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import socket
import statistics
import time
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError
from flexsfl.core.profile import DeviceProfile, read_profile, write_profile

__all__ = [
    "DEFAULT_BUDGET_FRACTION",
    "DeviceProfile",
    "HeadThroughput",
    "probe_device",
    "measure_head_throughput",
    "read_profile",
    "write_profile",
]

log = logging.getLogger("flexsfl.edge.probe")

# Training may use this share of the memory that is available when the probe runs: the rest is
# headroom for the OS, the page cache and whatever else the device runs.
DEFAULT_BUDGET_FRACTION = 0.5


# /proc/cpuinfo on aarch64 names cores by (implementer, part) only.
_ARM_CORES = {
    ("0x41", "0xd03"): "ARM Cortex-A53",
    ("0x41", "0xd04"): "ARM Cortex-A35",
    ("0x41", "0xd05"): "ARM Cortex-A55",
    ("0x41", "0xd07"): "ARM Cortex-A57",
    ("0x41", "0xd08"): "ARM Cortex-A72",  # Raspberry Pi 4
    ("0x41", "0xd09"): "ARM Cortex-A73",
    ("0x41", "0xd0a"): "ARM Cortex-A75",
    ("0x41", "0xd0b"): "ARM Cortex-A76",  # Raspberry Pi 5
    ("0x41", "0xd0c"): "ARM Neoverse-N1",
    ("0x41", "0xd0d"): "ARM Cortex-A77",
    ("0x41", "0xd41"): "ARM Cortex-A78",
    ("0x41", "0xd42"): "ARM Cortex-A78AE",  # Jetson Orin
    ("0x41", "0xd4f"): "ARM Neoverse-V2",
    ("0x4e", "0x004"): "NVIDIA Carmel",  # Jetson Xavier
}



def _read(root: pathlib.Path, rel: str) -> str | None:
    try:
        return (root / rel).read_text(errors="replace")
    except OSError:
        return None


def _meminfo(root: pathlib.Path) -> tuple[int, int]:
    """(MemTotal, MemAvailable) in MB from /proc/meminfo."""
    text = _read(root, "proc/meminfo")
    if text is None:
        raise ConfigError(f"{root / 'proc/meminfo'}: cannot read it (flexsfl devices run Linux); pass --memory-budget-mb")
    kb = {}
    for line in text.splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            kb[key.strip()] = int(parts[0])
    if "MemTotal" not in kb:
        raise ConfigError(f"{root / 'proc/meminfo'}: no MemTotal line; pass --memory-budget-mb")
    # Kernels before 3.14 have no MemAvailable; free memory is the closest thing they report.
    avail = kb.get("MemAvailable", kb.get("MemFree", kb["MemTotal"]))
    return kb["MemTotal"] * 1024 // 10**6, avail * 1024 // 10**6


def _cgroup_limit_mb(root: pathlib.Path) -> int | None:
    """The cgroup v2 memory limit of this process (systemd MemoryMax=, a container), if any."""
    text = _read(root, "sys/fs/cgroup/memory.max")
    if text is None or not text.strip().isdigit():
        return None  # no cgroup v2 or "max"
    return int(text.strip()) // 10**6


def _device_model(root: pathlib.Path) -> str:
    for rel in ("proc/device-tree/model", "sys/firmware/devicetree/base/model", "sys/devices/virtual/dmi/id/product_name"):
        text = _read(root, rel)
        if text and text.strip("\x00\n "):
            return text.strip("\x00\n ")
    return ""


def _cpu_model(root: pathlib.Path) -> str:
    text = _read(root, "proc/cpuinfo") or ""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip(), value.strip())
    if fields.get("model name"):  # x86, and some arm kernels
        return fields["model name"]
    impl, part = fields.get("CPU implementer", ""), fields.get("CPU part", "")
    if impl or part:
        return _ARM_CORES.get((impl.lower(), part.lower()), f"ARM implementer {impl} part {part}")
    return ""


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def probe_device(
    *,
    name: str | None = None,
    memory_budget_mb: int | None = None,
    budget_fraction: float = DEFAULT_BUDGET_FRACTION,
    head_gflops: float | None = None,
    backend: str = "",
    uplink_mbps: float | None = None,
    downlink_mbps: float | None = None,
    rtt_ms: float | None = None,
    root: str | os.PathLike = "/",
) -> DeviceProfile:
    """This machine's profile. ``root`` is where ``/proc``, ``/sys`` and ``/etc`` are read from.

    The budget is ``memory_budget_mb`` if given, else ``budget_fraction`` of the memory
    available now (capped by a cgroup v2 memory limit, when the process runs under one).
    ``arch`` and ``cores`` always describe the running process, whatever ``root`` is.
    """
    if not 0 < budget_fraction <= 1:
        raise ConfigError(f"budget_fraction must be in (0, 1], got {budget_fraction}")
    r = pathlib.Path(root)
    total, avail = _meminfo(r)
    limit = _cgroup_limit_mb(r)
    if limit is not None:
        avail = min(avail, limit)
    if memory_budget_mb is None:
        memory_budget_mb = max(1, int(avail * budget_fraction))
    elif isinstance(memory_budget_mb, int) and not isinstance(memory_budget_mb, bool) and memory_budget_mb > total:
        raise ConfigError(f"--memory-budget-mb {memory_budget_mb} is more than this device's {total} MB of RAM")
    jetson = _read(r, "etc/nv_tegra_release") is not None
    accelerator = "cuda" if jetson or (r / "dev/nvidia0").exists() else "none"
    return DeviceProfile(
        name=name or socket.gethostname() or "device",
        arch=os.uname().machine,
        cores=_cores(),
        memory_mb=total,
        memory_budget_mb=memory_budget_mb,
        head_gflops=head_gflops,
        uplink_mbps=uplink_mbps,
        downlink_mbps=downlink_mbps,
        rtt_ms=rtt_ms,
        device_model=_device_model(r),
        cpu_model=_cpu_model(r),
        accelerator=accelerator,
        backend=backend,
    )


@dataclasses.dataclass(frozen=True)
class HeadThroughput:
    """Timed head steps: ``gflops`` = the step's FLOPs / the median step time."""

    batch: int
    seq: int
    reps: int
    step_flops: float  # FLOPs of one forward + backward at (batch, seq)
    median_s: float
    min_s: float
    max_s: float

    @property
    def gflops(self) -> float:
        return self.step_flops / self.median_s / 1e9


def measure_head_throughput(
    backend: Any,
    *,
    batch: int,
    seq: int,
    step_flops: float,
    vocab_size: int,
    reps: int = 5,
    warmup: int = 1,
    seed: int = 0,
) -> HeadThroughput:
    """Time ``reps`` head steps (``forward(ids, mask, keep=True)`` then ``backward(grad_z)``).

    ``backend`` is an :class:`flexsfl.edge_runtime.backends.Backend`; its parameters are not changed
    (gradients are computed, no optimizer step is taken). Inputs are random token ids in
    ``[0, vocab_size)`` with a full attention mask, and a random ``grad_z`` of ``z``'s shape.
    ``step_flops`` is the FLOP count of one forward + backward at ``(batch, seq)``
    (:func:`flexsfl.core.cost.head_step_flops`); ``warmup`` untimed steps come first so
    one-time allocations and lazy initialisation are not counted.
    """
    if batch < 1 or seq < 2 or reps < 1 or warmup < 0:
        raise ConfigError(f"need batch >= 1, seq >= 2, reps >= 1, warmup >= 0 (got {batch}, {seq}, {reps}, {warmup})")
    if not step_flops > 0:
        raise ConfigError(f"step_flops must be > 0, got {step_flops}")
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab_size, size=(batch, seq), dtype=np.int64)
    mask = np.ones((batch, seq), dtype=np.int64)
    grad = None
    times = []
    for i in range(warmup + reps):
        t0 = time.perf_counter()
        z = backend.forward(ids, mask, keep=True)
        if grad is None:
            grad = rng.standard_normal(np.shape(z)).astype(np.float32)
        backend.backward(grad)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return HeadThroughput(
        batch=batch, seq=seq, reps=reps, step_flops=float(step_flops),
        median_s=statistics.median(times), min_s=min(times), max_s=max(times),
    )
