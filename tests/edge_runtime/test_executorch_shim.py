"""The ExecuTorch backend's torch-free runtime: flexsfl's C shim over the wheel's C++ libraries.

The shim runs the same program with the same kernels as ExecuTorch's torch-linked Python
bindings, so Z and the gradients must be bit-identical to theirs on the same bundle; it is built
into a per-user cache once and reused without a compiler; where it cannot be built, the bindings
are the fallback (and the backend says so), and with neither, one line says what to do.
"""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest

from flexsfl.core.bundle import load_bundle
from flexsfl.core.errors import BackendError
from flexsfl.edge_runtime.backends import executorch as et
from flexsfl.edge_runtime.backends import open_backend
from tests.no_torch import run_without_torch
from tests.integration.harness import ROOT, env

pytest.importorskip("executorch")


@pytest.fixture
def gpt2(tiny_bundles):
    return load_bundle(tiny_bundles("gpt2", 1, "all"))


def _batch(bundle, b, t, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, bundle.manifest.model.vocab_size, (b, t), dtype=np.int64)
    mask = np.ones((b, t), np.int64)
    mask[-1, max(1, t // 2):] = 0
    return ids, mask


def _steps(bundle, runtime, monkeypatch, low_memory="1"):
    """(Z, gradients, reference Z) per shape, and the runtime the backend says it used."""
    monkeypatch.setenv(et.RUNTIME_ENV, runtime)
    monkeypatch.setenv(et.LOW_MEMORY_ENV, low_memory)
    be = open_backend("executorch", bundle, threads=1)
    assert be.low_memory == (runtime == "shim" and low_memory == "1")
    rng = np.random.default_rng(7)
    phi = {n: (a + 0.01 * rng.standard_normal(a.shape)).astype(np.float32) for n, a in be.params.items()}
    out = []
    for b, t, seed in [(1, 2, 0), (3, 17, 1), (bundle.manifest.max_batch, bundle.manifest.max_seq, 2)]:
        ids, mask = _batch(bundle, b, t, seed)
        z = be.forward(ids, mask)
        z_ref = be.forward(ids, mask, params=phi, keep=False)  # must not disturb the kept forward
        g = np.random.default_rng(seed).standard_normal(z.shape).astype(np.float32)
        out.append((z, be.backward(g), z_ref))
    return out, be.runtime


def test_shim_matches_the_torch_linked_bindings_bit_for_bit(gpt2, monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path))
    shim, rt_shim = _steps(gpt2, "shim", monkeypatch)
    low, rt_low = _steps(gpt2, "shim", monkeypatch, low_memory="0")  # planned memory kept resident
    bind, rt_bind = _steps(gpt2, "pybindings", monkeypatch)
    assert (rt_shim, rt_low, rt_bind) == ("shim", "shim", "pybindings")
    for (z1, g1, r1), (z2, g2, r2) in [*zip(shim, bind), *zip(low, bind)]:
        assert z1.dtype == np.float32 and z1.flags.c_contiguous and np.array_equal(z1, z2) and np.array_equal(r1, r2)
        assert not np.array_equal(z1, r1)  # the reference forward ran with other adapters
        assert list(g1) == list(g2) and all(np.array_equal(g1[n], g2[n]) for n in g1)


def test_shim_is_built_once_per_install_and_reused_without_a_compiler(gpt2, tmp_path):
    # First process: builds into the empty cache. Second: no compiler at all, loads the built library.
    script = textwrap.dedent(
        """
        import json
        from flexsfl.core.bundle import load_bundle
        from flexsfl.edge_runtime.backends import open_backend
        from flexsfl.edge_runtime.backends.executorch import shim_library
        be = open_backend("executorch", load_bundle(_sys.argv[1]), threads=1)
        print(json.dumps({"runtime": be.runtime, "lib": str(shim_library())}))
        """
    )
    first = run_without_torch(script, str(gpt2.root), extra_env={"FLEXSFL_CACHE": str(tmp_path)})
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_without_torch(script, str(gpt2.root), extra_env={"FLEXSFL_CACHE": str(tmp_path), "CXX": "/no/such/g++"})
    assert again.returncode == 0, again.stderr[-2000:]
    a, b = (json.loads(p.stdout.strip().splitlines()[-1]) for p in (first, again))
    assert a == b and a["runtime"] == "shim"
    lib = a["lib"]
    assert lib.startswith(str(tmp_path / "executorch-shim")) and os.path.isfile(lib)
    assert os.stat(os.path.dirname(os.path.dirname(lib))).st_mode & 0o077 == 0  # private to this user
    assert [f for f in os.listdir(os.path.dirname(lib))] == ["libflexsfl_et.so"]  # no build leftovers


NO_COMPILER = textwrap.dedent(
    """
    import json
    from flexsfl.core.bundle import load_bundle
    from flexsfl.core.errors import BackendError
    from flexsfl.edge_runtime.backends import open_backend
    try:
        be = open_backend("executorch", load_bundle(_sys.argv[1]), threads=1)
        got = {"runtime": be.runtime}
    except BackendError as e:
        got = {"error": str(e)}
    print(json.dumps({**got, "torch": "torch" in _sys.modules}))
    """
)


def test_without_compiler_or_torch_one_line_says_what_to_do(gpt2, tmp_path):
    proc = run_without_torch(NO_COMPILER, str(gpt2.root), extra_env={"FLEXSFL_CACHE": str(tmp_path), "CXX": "/no/such/g++"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "\n" not in res["error"] and not res["torch"]
    assert "no C++ compiler" in res["error"] and "install g++" in res["error"] and "--backend ort" in res["error"]


def test_without_compiler_the_bindings_are_the_fallback_and_the_backend_says_so(gpt2, tmp_path):
    import subprocess
    import sys

    code = NO_COMPILER.replace("import json", "import json, sys as _sys, logging\nlogging.basicConfig()", 1)
    proc = subprocess.run([sys.executable, "-c", code, str(gpt2.root)], capture_output=True, text=True, cwd=ROOT,
                          env=env({"FLEXSFL_CACHE": str(tmp_path), "CXX": "/no/such/g++"}), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res == {"runtime": "pybindings", "torch": True}
    assert "no C++ compiler" in proc.stderr and "torch-linked Python bindings" in proc.stderr


def test_a_cache_others_may_write_is_refused(monkeypatch, tmp_path):
    folder = tmp_path / "executorch-shim"
    folder.mkdir()
    folder.chmod(0o777)
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path))
    with pytest.raises(BackendError, match="no one else may write") as e:
        et.shim_library()
    assert "\n" not in str(e.value)


def test_backward_refuses_activations_of_another_forward(gpt2, monkeypatch, tmp_path):
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path))
    monkeypatch.setenv(et.RUNTIME_ENV, "shim")
    be = open_backend("executorch", gpt2, threads=1)
    ids, mask = _batch(gpt2, 2, 5, 0)
    z = be.forward(ids, mask)
    stale = be._kept
    be.forward(ids, mask)  # a newer kept forward: the first one's staged activations are gone
    be._kept = stale
    with pytest.raises(BackendError, match="other than the last kept forward"):
        be.backward(np.ones_like(z))


def test_an_unknown_runtime_choice_is_refused(gpt2, monkeypatch):
    monkeypatch.setenv(et.RUNTIME_ENV, "torch")
    with pytest.raises(BackendError, match="choose shim or pybindings"):
        open_backend("executorch", gpt2)


@pytest.mark.slow
def test_top_methods_match_the_bindings_bit_for_bit(tiny_model_dirs, monkeypatch, tmp_path):
    from flexsfl.edge_runtime.top import open_top
    from flexsfl.export.pipeline import ExportConfig, export_bundle

    bundle, _ = export_bundle(ExportConfig(model=str(tiny_model_dirs["gpt2"]), split=1, top=1, out=str(tmp_path / "b"),
                                           backend="executorch", task="causal_lm", max_batch=4, max_seq=24),
                              progress=False)
    monkeypatch.setenv("FLEXSFL_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    h = rng.standard_normal((3, 13, bundle.manifest.model.hidden_size)).astype(np.float32)
    mask = np.ones((3, 13), np.int64)
    labels = rng.integers(0, bundle.manifest.model.vocab_size, (3, 13), dtype=np.int64)
    got = {}
    for runtime in ("shim", "pybindings"):
        monkeypatch.setenv(et.RUNTIME_ENV, runtime)
        top = open_top(bundle, "executorch", threads=1)
        step = top.train_step(h, mask, labels)
        got[runtime] = (step.loss, step.grad_h, step.grads, top.predict(h, mask))
    (l1, h1, g1, p1), (l2, h2, g2, p2) = got["shim"], got["pybindings"]
    assert l1 == l2 and np.array_equal(h1, h2) and np.array_equal(p1, p2)
    assert all(np.array_equal(g1[n], g2[n]) for n in g1)
