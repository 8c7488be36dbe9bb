"""flexsfl.edge_runtime.probe: this machine's facts, board detection, strict profile JSON, head timing."""

from __future__ import annotations

import json
import os
import platform

import numpy as np
import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.edge_runtime.probe import (
    DEFAULT_BUDGET_FRACTION,
    DeviceProfile,
    measure_head_throughput,
    probe_device,
    read_profile,
    write_profile,
)
from tests.no_torch import run_without_torch


def _meminfo_kb(key: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise AssertionError(key)


def test_probe_reads_this_machines_facts():
    p = probe_device()
    assert p.arch == platform.machine()
    assert p.cores == len(os.sched_getaffinity(0))
    assert p.memory_mb == os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 10**6
    # half of what is available now (it moves a little between the two reads)
    avail = _meminfo_kb("MemAvailable") * 1024 / 1e6
    assert p.memory_budget_mb == pytest.approx(avail * DEFAULT_BUDGET_FRACTION, rel=0.05)
    with open("/proc/cpuinfo") as f:
        cpuinfo = f.read()
    if "model name" in cpuinfo:
        assert p.cpu_model and p.cpu_model in cpuinfo
    assert p.head_gflops is None and p.uplink_mbps is None
    assert probe_device(memory_budget_mb=123, budget_fraction=0.9).memory_budget_mb == 123


def test_profile_json_round_trips_and_omits_unknowns(tmp_path):
    p = probe_device(name="bench-box", head_gflops=12.5, backend="ort", uplink_mbps=40, downlink_mbps=90.5, rtt_ms=0)
    d = p.to_json()
    assert json.loads(json.dumps(d)) == d
    assert all(isinstance(v, (bool, int, float, str)) for v in d.values())  # what Hello.profile carries
    assert DeviceProfile.from_json(d) == p
    bare = probe_device()
    assert "head_gflops" not in bare.to_json() and DeviceProfile.from_json(bare.to_json()) == bare
    path = tmp_path / "profile.json"
    write_profile(p, path)
    assert read_profile(path) == p
    assert path.read_text() == json.dumps(d, indent=2, sort_keys=True) + "\n"


GOOD = {"name": "pi", "arch": "aarch64", "cores": 4, "memory_mb": 3793, "memory_budget_mb": 1500}


@pytest.mark.parametrize(
    "change,message",
    [
        ({"cores": "4"}, "field 'cores' must be an int >= 1, got '4'"),
        ({"cores": True}, "field 'cores' must be an int >= 1, got True"),
        ({"memory_mb": 0}, "field 'memory_mb' must be an int >= 1"),
        ({"memory_budget_mb": 5000}, "field 'memory_budget_mb' (5000) exceeds 'memory_mb' (3793)"),
        ({"head_gflops": -1.0}, "field 'head_gflops' must be a number > 0"),
        ({"head_gflops": float("nan")}, "field 'head_gflops' must be a number > 0"),
        ({"uplink_mbps": "fast"}, "field 'uplink_mbps' must be a number > 0"),
        ({"rtt_ms": -3}, "field 'rtt_ms' must be a number >= 0"),
        ({"accelerator": "tpu"}, "field 'accelerator' must be one of none, cuda"),
        ({"name": " "}, "field 'name' must be a non-empty string"),
        ({"memory": 4096}, "unknown field 'memory'; known fields: name, arch"),
        ({"arch": None}, "field 'arch' must be a non-empty string"),
    ],
)
def test_bad_profile_files_give_one_line_naming_the_field(tmp_path, change, message):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({**GOOD, **change}))
    with pytest.raises(ConfigError) as e:
        read_profile(path)
    assert str(e.value).startswith(f"{path}: ") and message in str(e.value) and "\n" not in str(e.value)


def test_missing_fields_and_broken_files(tmp_path):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({k: v for k, v in GOOD.items() if k != "memory_budget_mb"}))
    with pytest.raises(ConfigError, match=r"profile.json: missing field 'memory_budget_mb'; write it with `flexsfl edge probe"):
        read_profile(path)
    path.write_text('{"name": "pi",')
    with pytest.raises(ConfigError, match=r"profile.json: not valid JSON"):
        read_profile(path)
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"profile.json: must be a JSON object, got list"):
        read_profile(path)
    with pytest.raises(ConfigError, match=r"nope.json: cannot read the device profile \(No such file"):
        read_profile(tmp_path / "nope.json")


# Files as a Raspberry Pi 4 (4 GB, 64-bit Raspberry Pi OS) and a Jetson Orin Nano (JetPack 6) have them.
PI4 = {
    "proc/meminfo": "MemTotal:        3884172 kB\nMemFree:         3226400 kB\nMemAvailable:    3525700 kB\n"
                    "Buffers:           34472 kB\nCached:           345416 kB\n",
    "proc/cpuinfo": "".join(
        f"processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
        "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n\n" for i in range(4)
    ) + "Hardware\t: BCM2835\nRevision\t: c03114\nSerial\t\t: 100000002a5d4e1b\nModel\t\t: Raspberry Pi 4 Model B Rev 1.4\n",
    "proc/device-tree/model": "Raspberry Pi 4 Model B Rev 1.4\x00",
}
ORIN = {
    "proc/meminfo": "MemTotal:        7620004 kB\nMemFree:         5843212 kB\nMemAvailable:    6602816 kB\n",
    "proc/cpuinfo": "processor\t: 0\nBogoMIPS\t: 62.50\nCPU implementer\t: 0x41\nCPU architecture: 8\n"
                    "CPU variant\t: 0x1\nCPU part\t: 0xd42\nCPU revision\t: 1\n\n",
    "proc/device-tree/model": "NVIDIA Jetson Orin Nano Developer Kit\x00",
    "etc/nv_tegra_release": "# R36 (release), REVISION: 3.0, GCID: 36923193, BOARD: generic, EABI: aarch64, "
                            "DATE: Fri Jul 19 23:24:25 UTC 2024\n# KERNEL_VARIANT: oot\n",
    "sys/fs/cgroup/memory.max": "2147483648\n",
}


def _root(tmp_path, files):
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


def test_raspberry_pi_is_recognised(tmp_path):
    p = probe_device(root=_root(tmp_path, PI4), name="pi4")
    assert p.device_model == "Raspberry Pi 4 Model B Rev 1.4"
    assert p.cpu_model == "ARM Cortex-A72"
    assert p.accelerator == "none"
    assert p.memory_mb == 3884172 * 1024 // 10**6 == 3977
    assert p.memory_budget_mb == int(3525700 * 1024 // 10**6 * DEFAULT_BUDGET_FRACTION)


def test_jetson_is_recognised_and_a_cgroup_limit_caps_the_budget(tmp_path):
    p = probe_device(root=_root(tmp_path, ORIN), budget_fraction=1.0)
    assert (p.device_model, p.cpu_model, p.accelerator) == ("NVIDIA Jetson Orin Nano Developer Kit", "ARM Cortex-A78AE", "cuda")
    assert p.memory_budget_mb == 2147  # the service's MemoryMax, not the 6.7 GB available


def test_probe_refuses_impossible_settings(tmp_path):
    root = _root(tmp_path, PI4)
    with pytest.raises(ConfigError, match="--memory-budget-mb 9000 is more than this device's 3977 MB"):
        probe_device(root=root, memory_budget_mb=9000)
    with pytest.raises(ConfigError, match=r"budget_fraction must be in \(0, 1\]"):
        probe_device(root=root, budget_fraction=1.5)
    with pytest.raises(ConfigError, match="proc/meminfo: cannot read it"):
        probe_device(root=tmp_path / "empty")


class MatmulHead:
    """A numpy head of ``layers`` frozen d×d matmuls with a trainable bias each; FLOPs are exact.

    Forward per token: 2·d² per layer; backward: 2·d² per layer for the input gradient (frozen
    weights), as in the real heads.
    """

    def __init__(self, vocab=50, d=64, layers=3):
        rng = np.random.default_rng(0)
        self.emb = rng.standard_normal((vocab, d), dtype=np.float32)
        self.w = [rng.standard_normal((d, d), dtype=np.float32) / 8 for _ in range(layers)]
        self.params = {f"bias.{i}": np.zeros(d, np.float32) for i in range(layers)}
        self.calls = []
        self._kept = None

    def flops(self, batch, seq):
        d = self.emb.shape[1]
        return batch * seq * len(self.w) * 4 * d * d

    def forward(self, input_ids, attention_mask, *, keep=True):
        self.calls.append(("forward", input_ids.dtype, input_ids.shape, int(input_ids.max()), attention_mask.dtype))
        h = self.emb[input_ids] * attention_mask[..., None]
        for i, w in enumerate(self.w):
            h = h @ w + self.params[f"bias.{i}"]
        self._kept = keep
        return h

    def backward(self, grad_z):
        assert self._kept, "backward without a kept forward"
        self.calls.append(("backward", grad_z.dtype, grad_z.shape))
        grads, g = {}, grad_z
        for i in reversed(range(len(self.w))):
            grads[f"bias.{i}"] = g.sum(axis=(0, 1))
            g = g @ self.w[i].T
        self._kept = None
        return grads


def test_measure_head_throughput_times_forward_and_backward():
    head = MatmulHead()
    before = {k: v.copy() for k, v in head.params.items()}
    t = measure_head_throughput(head, batch=4, seq=32, reps=3, warmup=2, vocab_size=50, step_flops=head.flops(4, 32))
    assert (t.batch, t.seq, t.reps) == (4, 32, 3)
    assert [c[0] for c in head.calls] == ["forward", "backward"] * 5  # 2 warm-up + 3 timed steps
    fwd, bwd = head.calls[0], head.calls[1]
    assert fwd[1] == np.int64 and fwd[2] == (4, 32) and fwd[3] < 50 and fwd[4] == np.int64
    assert bwd[1] == np.float32 and bwd[2] == (4, 32, 64)
    assert all(np.array_equal(before[k], head.params[k]) for k in before)  # timing does not train
    assert 0 < t.min_s <= t.median_s <= t.max_s
    assert t.gflops == pytest.approx(head.flops(4, 32) / t.median_s / 1e9)
    # Four times the work at the same rate takes longer, and the rate stays the same order.
    big = MatmulHead(d=128, layers=6)
    t_big = measure_head_throughput(big, batch=4, seq=32, reps=3, vocab_size=50, step_flops=big.flops(4, 32))
    assert t_big.median_s > t.median_s
    with pytest.raises(ConfigError, match="need batch >= 1, seq >= 2"):
        measure_head_throughput(head, batch=0, seq=32, vocab_size=50, step_flops=1.0)


@pytest.fixture(scope="module")
def ort_bundle(tiny_model_dirs, tmp_path_factory):
    """A real bundle with ONNX Runtime programs: the tiny Llama cut at split 2."""
    from flexsfl.core.bundle import load_bundle
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    out = tmp_path_factory.mktemp("probe") / "bundle"
    export_bundle(ExportConfig(model=str(tiny_model_dirs["llama"]), split=2, out=str(out), backend="ort", max_batch=4,
                               max_seq=32, ort_training_artifacts=False), progress=False)
    return load_bundle(out)


@pytest.mark.slow
def test_measure_head_throughput_with_the_real_ort_backend(ort_bundle):
    from flexsfl.edge_runtime.backends import open_backend
    from flexsfl.core.cost import ModelCost, head_step_flops

    m = ort_bundle.manifest
    backend = open_backend("ort", ort_bundle, threads=1)
    before = backend.get_params()
    flops = head_step_flops(ModelCost.from_manifest(m), m.split, batch=4, seq=32)
    t = measure_head_throughput(backend, batch=4, seq=32, reps=4, vocab_size=m.model.vocab_size, step_flops=flops)
    assert t.reps == 4 and 0 < t.min_s <= t.median_s <= t.max_s
    assert t.gflops == pytest.approx(flops / t.median_s / 1e9) and t.gflops > 0
    after = backend.get_params()
    assert all(np.array_equal(before[k], after[k]) for k in before)  # timing does not train


def test_probe_runs_without_torch():
    out = run_without_torch("import flexsfl.edge_runtime.probe as p\np.probe_device()\nassert not BLOCKED_ATTEMPTS")
    assert out.returncode == 0, out.stderr[-2000:]
