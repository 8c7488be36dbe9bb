"""The torch-free edge runtime on an emulated Raspberry Pi 4 (aarch64 Debian, onnxruntime from PyPI).

Proves installability and numerics, not speed: emulation is 100-300x slower than the host.
"""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle

from .conftest import to_device

pytestmark = pytest.mark.arm64  # make test-arm64; deselected from make test

HERE = pathlib.Path(__file__).parent
TOL = 1e-5


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_edge_runtime_imports_without_torch_and_probe_sees_a_cortex_a72(arm64_device, device_python, minilm_bundle):
    dev = arm64_device
    imports = dev.run([device_python, "-c",
                       "import platform, sys, onnxruntime; import flexsfl.edge_runtime.client, flexsfl.edge_runtime.trainer; "
                       "from flexsfl.edge_runtime.backends import ort; "
                       "print(platform.machine(), onnxruntime.__version__, 'torch' in sys.modules)"])
    machine, version, torch_loaded = imports.stdout.split()
    assert (machine, torch_loaded) == ("aarch64", "False")
    assert tuple(int(p) for p in version.split(".")[:2]) >= (1, 32), version  # PyPI's newest aarch64 wheel
    no_torch = dev.run([device_python, "-c", "import torch"], check=False)
    assert no_torch.returncode != 0 and "No module named 'torch'" in no_torch.stderr

    bundle = to_device(dev, minilm_bundle, "minilm-probe")
    probe = dev.run([f"{pathlib.Path(device_python).parent}/flexsfl", "edge", "probe", "--bundle", bundle,
                     "--backend", "ort", "--threads", "1", "--batch", "1", "--seq", "8", "--reps", "1"], timeout=900)
    profile = json.loads(probe.stdout)
    assert "Cortex-A72" in json.dumps(profile), profile
    assert profile.get("arch", "aarch64") == "aarch64" and profile["head_gflops"] > 0
    print(f"emulated probe: {profile}")


def test_head_step_on_the_device_equals_the_x86_step(arm64_device, device_python, minilm_bundle, tmp_path):
    """forward + backward + SGD from the x86-exported programs in aarch64 onnxruntime: Z, grads, θ to 1e-5."""
    dev = arm64_device
    m = load_bundle(minilm_bundle).manifest
    rng = np.random.default_rng(0)
    b, t = 2, 16
    mask = np.ones((b, t), np.int64)
    mask[1, 11:] = 0  # a padded row
    batch = {"input_ids": rng.integers(1000, m.model.vocab_size, (b, t), dtype=np.int64), "attention_mask": mask,
             "grad_z": rng.standard_normal((b, t, m.model.hidden_size)).astype(np.float32)}
    np.savez(tmp_path / "in.npz", **batch)
    subprocess.run([sys.executable, str(HERE / "head_step.py"), str(minilm_bundle), str(tmp_path / "in.npz"),
                    str(tmp_path / "x86.npz")], check=True, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    args = [to_device(dev, minilm_bundle, "minilm-step"), to_device(dev, tmp_path / "in.npz", "in.npz"), "/tmp/arm.npz"]
    dev.run([device_python, to_device(dev, HERE / "head_step.py", "head_step.py"), *args], timeout=900)
    x86, arm = np.load(tmp_path / "x86.npz"), np.load(dev.root / "tmp" / "arm.npz")
    versions = [bytes(r["ort_version"]).decode() for r in (x86, arm)]
    assert not arm["torch_loaded"]
    assert set(x86.files) == set(arm.files) and len([k for k in x86.files if k.startswith("grad/")]) == len(
        m.trainable_parameters)
    errs = {k: rel_err(arm[k], x86[k]) for k in x86.files if k not in ("ort_version", "torch_loaded")}
    worst = max(errs, key=errs.get)
    print(f"onnxruntime {versions[1]} (aarch64) vs {versions[0]} (x86): rel err z {errs['z']:.1e}, "
          f"z after step {errs['z_after']:.1e}, grads max {max(v for k, v in errs.items() if k.startswith('grad/')):.1e}, "
          f"params max {max(v for k, v in errs.items() if k.startswith('param/')):.1e}")
    assert errs[worst] <= TOL, f"{worst}: rel err {errs[worst]:.2e}"
    assert rel_err(x86["z_after"], x86["z"]) > 100 * TOL  # the step did move θ: the comparison has teeth


def test_device_refuses_an_older_onnxruntime_with_one_line(arm64_device, device_python, minilm_bundle):
    """The manifest's minimum runtime is enforced on the device too (the older version is passed in)."""
    bundle = to_device(arm64_device, minilm_bundle, "minilm-skew")
    need = load_bundle(minilm_bundle).manifest.runtime["ort"]
    check = arm64_device.run([device_python, "-c",
                              "import sys; from flexsfl.core.bundle import load_bundle; "
                              "from flexsfl.edge_runtime.backends.ort import OrtBackend; "
                              f"b = load_bundle({bundle!r}); OrtBackend(b, threads=1); "
                              "OrtBackend(b, threads=1, runtime_version='1.16.3')"], check=False)
    assert check.returncode == 1
    last = check.stderr.strip().splitlines()[-1]
    assert f"onnxruntime 1.16.3 is too old" in last and f"pip install 'onnxruntime>={need['min_onnxruntime']}'" in last
