"""A wheel built from the repository: one top-level name, every package, and a device without torch.

The role folders (``edge_runtime/``, ``export/``, ...) sit at the top of the repository and are
mapped into the ``flexsfl`` namespace by pyproject.toml's ``[tool.setuptools] package-dir``; a
folder the ``packages`` list forgets is silently left out of the wheel, so the check below derives
the packages from the folders and compares.

The device half installs the wheel into a fresh venv that has no torch (no system site-packages;
dependencies come from a wheelhouse in pytest's cache, filled by ``pip download`` the first time)
and runs ``flexsfl`` from it. The fast test imports the edge client and builds the command's
parser there; the slow one trains a real round against a ``flexsfl serve`` started from the
development environment, with ``flexsfl edge run --backend ort`` from the wheel's venv.
"""

from __future__ import annotations

import ast
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
import zipfile

import pytest

from tests.integration.harness import ROOT, events, finish, flexsfl, free_port, wait_listening

PIP = [sys.executable, "-m", "pip"]


# --- what the wheel must hold ----------------------------------------------------------------


def expected_packages(root: pathlib.Path) -> tuple[dict[str, pathlib.Path], list[str]]:
    """(package -> folder) for every folder with Python files under a mapped folder, and the
    problems found: such a folder missing from ``packages``, a listed package with no folder, or a
    top-level folder with an ``__init__.py`` that nothing maps."""
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {pkg: (root / folder).resolve() for pkg, folder in tool["package-dir"].items()}
    listed = set(tool["packages"])
    found: dict[str, pathlib.Path] = {}
    for pkg, folder in mapping.items():
        for d in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
            if "__pycache__" in d.parts or not any(d.glob("*.py")):
                continue
            owner = max((p for p in mapping if d == mapping[p] or mapping[p] in d.parents), key=lambda p: len(mapping[p].parts))
            if owner == pkg:
                found[".".join([pkg, *d.relative_to(folder).parts])] = d
    problems = [f"{name} ({d.relative_to(root)}/) is not in [tool.setuptools] packages" for name, d in found.items()
                if name not in listed]
    problems += [f"{name} is listed in packages but has no folder with Python files" for name in sorted(listed - set(found))]
    mapped = set(mapping.values())
    problems += [f"{d.name}/ has an __init__.py but is not in [tool.setuptools.package-dir]"
                 for d in sorted(root.iterdir()) if (d / "__init__.py").is_file() and d.resolve() not in mapped
                 and d.name != "tests"]
    return found, problems


def test_the_package_check_catches_a_forgotten_subpackage(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        '[tool.setuptools]\npackages = ["flexsfl", "flexsfl.edge_runtime"]\n'
        '[tool.setuptools.package-dir]\n"flexsfl" = "flexsfl"\n"flexsfl.edge_runtime" = "edge_runtime"\n')
    for folder in ("flexsfl", "edge_runtime", "edge_runtime/backends", "stray"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "edge_runtime" / "wire").mkdir()  # an empty folder is no package
    found, problems = expected_packages(tmp_path)
    assert set(found) == {"flexsfl", "flexsfl.edge_runtime", "flexsfl.edge_runtime.backends"}
    assert problems == ["flexsfl.edge_runtime.backends (edge_runtime/backends/) is not in [tool.setuptools] packages",
                        "stray/ has an __init__.py but is not in [tool.setuptools.package-dir]"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> pathlib.Path:
    """``pip wheel`` of a copy of the working tree (the build writes build/ and *.egg-info into the
    source folder; the copy keeps them out of the checkout)."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    # What a clone with the local changes holds: tracked files and new ones git does not ignore.
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            capture_output=True, text=True)
    if listed.returncode == 0:
        for rel in filter(None, listed.stdout.split("\0")):
            if (ROOT / rel).is_file():
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / rel, src / rel)
    else:  # not a git checkout (an unpacked sdist, say)
        shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache", "results",
                                                                 "build", "*.egg-info"))
    out = subprocess.run([*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(tmp / "dist"), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    (whl,) = (tmp / "dist").glob("flexsfl-*.whl")
    return whl


def test_wheel_installs_only_the_flexsfl_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    dist_info = [t for t in top if t.endswith(".dist-info")]
    assert top == {"flexsfl", *dist_info} and len(dist_info) == 1 and dist_info[0].startswith("flexsfl-"), sorted(top)
    # The command a user types is the package's own entry point.
    entry = zipfile.ZipFile(wheel).read(f"{dist_info[0]}/entry_points.txt").decode()
    assert "flexsfl = flexsfl.cli:main" in entry


def _string_literals(path: pathlib.Path) -> set[str]:
    """The string constants of a module, docstrings left out."""
    tree = ast.parse(path.read_text())
    docs = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)}
    return {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str) and id(n) not in docs}


def test_wheel_holds_every_package_and_module(wheel):
    found, problems = expected_packages(ROOT)
    assert not problems, problems
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = []
    for pkg, folder in found.items():
        for f in folder.glob("*.py"):
            inside = "/".join([*pkg.split("."), f.name])
            if inside not in names:
                missing.append(f"{f.relative_to(ROOT)} -> {inside}")
        # package data: a file beside the modules that one of them names (a page, a template)
        named = set().union(*(_string_literals(f) for f in folder.glob("*.py")))
        for f in folder.iterdir():
            if f.is_file() and f.suffix not in (".py", ".pyc") and f.name in named:
                inside = "/".join([*pkg.split("."), f.name])
                if inside not in names:
                    missing.append(f"{f.relative_to(ROOT)} -> {inside} (package data: add it to package-data)")
    assert not missing, f"the wheel lacks {len(missing)} file(s): {missing[:10]}"
    assert {"flexsfl/core/__init__.py", "flexsfl/edge_runtime/client.py", "flexsfl/server_backend/strategy.py",
            "flexsfl/export/__init__.py", "flexsfl/benchmarks/__init__.py"} <= names


# --- a device without torch ------------------------------------------------------------------


def _pip_into(venv: pathlib.Path, wheelhouse: pathlib.Path, requirement: str) -> None:
    """Install ``requirement`` into ``venv`` from the wheelhouse only; on a miss, ``pip download``
    what it needs into the wheelhouse (the first run, or after a dependency changed) and retry."""
    install = [*PIP, "--python", str(venv / "bin" / "python"), "install", "-q", "--no-compile", "--no-index",
               "--find-links", str(wheelhouse), requirement]
    out = subprocess.run(install, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        dl = subprocess.run([*PIP, "download", "-q", "--only-binary=:all:", "-d", str(wheelhouse), requirement],
                            capture_output=True, text=True, timeout=900)
        assert dl.returncode == 0, f"cannot fetch the wheel's dependencies from the package index: {dl.stderr[-1500:]}"
        for stale in wheelhouse.glob("flexsfl-*.whl"):  # the wheel under test is always the one just built
            stale.unlink()
        out = subprocess.run(install, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.fixture(scope="module")
def device_venv(wheel, tmp_path_factory, request) -> pathlib.Path:
    """A venv with the wheel and its base dependencies, no torch and no system site-packages."""
    venv = tmp_path_factory.mktemp("device") / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    wheelhouse = request.config.cache.mkdir("flexsfl-wheelhouse")
    _pip_into(venv, wheelhouse, str(wheel))
    return venv


def device_env() -> dict:
    """The environment of a process on the device: nothing from the checkout on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    return {**env, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def run_on_device(venv: pathlib.Path, cwd: pathlib.Path, *cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(venv / "bin" / cmd[0]), *cmd[1:]], capture_output=True, text=True, env=device_env(),
                          cwd=cwd, timeout=300)


WHERE = """
import importlib.util, json, sys, flexsfl, flexsfl.edge_runtime.client
print(json.dumps({"torch": importlib.util.find_spec("torch") is not None, "file": flexsfl.__file__,
                  "version": flexsfl.__version__, "modules": "torch" in sys.modules}))
"""


def test_edge_client_imports_from_the_wheel_without_torch(device_venv, wheel, tmp_path):
    out = run_on_device(device_venv, tmp_path, "python", "-c", WHERE)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout)
    assert r["torch"] is False and r["modules"] is False
    assert pathlib.Path(r["file"]).is_relative_to(device_venv), r["file"]  # the installed copy, not the checkout
    assert r["version"] == wheel.name.split("-")[1]  # from importlib.metadata
    helped = run_on_device(device_venv, tmp_path, "flexsfl", "edge", "run", "--help")
    assert helped.returncode == 0 and "--backend" in helped.stdout, helped.stderr[-3000:]


@pytest.mark.slow
def test_flexsfl_edge_run_from_the_wheel_trains_a_round(device_venv, wheel, request, tmp_path, tiny_model_dirs, tiny_bundles):
    from flexsfl.edge_runtime.data import Example, write_jsonl
    from flexsfl.server_backend.clients import add_client

    _pip_into(device_venv, request.config.cache.mkdir("flexsfl-wheelhouse"), f"{wheel}[edge]")
    bundle = tiny_bundles("llama", 2, "ort")
    words = ["good", "great", "fine", "bad", "awful", "poor"]
    write_jsonl(tmp_path / "train.jsonl", [Example(f"a {w} film, {i}", int(k >= 3)) for i in range(4) for k, w in enumerate(words)])
    reg = tmp_path / "clients.json"
    (tmp_path / "dev.token").write_text(add_client(reg, "dev"))
    port, steps = free_port(), 3
    slog, clog = tmp_path / "server.log", tmp_path / "client.log"
    server = flexsfl("serve", "--model", str(tiny_model_dirs["llama"]), "--num-labels", "2", "--port", str(port),
                     "--clients", str(reg), "--state-dir", str(tmp_path / "state"), "--rounds", "1", "--local-steps",
                     str(steps), "--batch-size", "4", "--lr", "0.01", "--optimizer", "sgd", "--threads", "1", log=slog)
    procs = {"server": (server, slog)}
    try:
        wait_listening(port, server, slog)
        client = subprocess.Popen(
            [str(device_venv / "bin" / "flexsfl"), "-v", "edge", "run", "--bundle", str(bundle), "--server",
             f"ws://127.0.0.1:{port}", "--data", str(tmp_path / "train.jsonl"), "--client-id", "dev", "--token-file",
             str(tmp_path / "dev.token"), "--backend", "ort", "--threads", "1", "--state-dir", str(tmp_path / "device"),
             "--max-retries", "3"],
            stdout=open(clog, "w"), stderr=subprocess.STDOUT, env=device_env(), cwd=tmp_path)
        procs["client"] = (client, clog)
    finally:
        finish(procs, timeout=600)
    assert [s.split(":")[0] for e in events(tmp_path / "state", "batch") for s in e["steps"]] == ["dev"] * steps
    out = run_on_device(device_venv, tmp_path, "python", "-c", WHERE)
    assert json.loads(out.stdout)["torch"] is False
