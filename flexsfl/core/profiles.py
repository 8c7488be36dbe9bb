"""Illustrative device profiles for the demo and the docs (typical rates and budgets, not measurements)."""

from __future__ import annotations

from flexsfl.core.profile import DeviceProfile

__all__ = ["EXAMPLE_PROFILES"]

# Illustrative devices for the demo and the docs (typical achieved rates and budgets, not
# measurements), running the plain onnxruntime wheel, which has aarch64 builds. With minilm at
# batch 8, seq 128 and the default server (200 GFLOP/s shared by 16 clients) they land on
# different splits for different reasons: the Pi 4 is slower than its share of the server
# (split 1, although 2 blocks would fit); the Pi 5 is faster, so it wants every block, but it
# shares its RAM with other services and its budget stops it at split 3; the Jetson is faster
# still, with room for every split point (split 5), despite its slow uplink, which costs the
# same at every split.
EXAMPLE_PROFILES: dict[str, DeviceProfile] = {
    p.name: p
    for p in (
        DeviceProfile(
            name="rpi4", arch="aarch64", cores=4, memory_mb=4096, memory_budget_mb=400, head_gflops=4.0,
            uplink_mbps=20.0, downlink_mbps=50.0, rtt_ms=15.0, device_model="Raspberry Pi 4 Model B (example)",
            cpu_model="ARM Cortex-A72", backend="ort",
        ),
        DeviceProfile(
            name="rpi5", arch="aarch64", cores=4, memory_mb=8192, memory_budget_mb=280, head_gflops=20.0,
            uplink_mbps=100.0, downlink_mbps=100.0, rtt_ms=5.0, device_model="Raspberry Pi 5 (example)",
            cpu_model="ARM Cortex-A76", backend="ort",
        ),
        DeviceProfile(
            name="jetson-orin", arch="aarch64", cores=6, memory_mb=8192, memory_budget_mb=2048, head_gflops=60.0,
            uplink_mbps=10.0, downlink_mbps=40.0, rtt_ms=40.0, device_model="Jetson Orin Nano 8GB (example)",
            cpu_model="ARM Cortex-A78AE", accelerator="cuda", backend="ort",
        ),
    )
}
