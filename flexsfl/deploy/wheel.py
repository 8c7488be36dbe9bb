"""The runtime wheel a device installs: built from this checkout, compared by contents."""

from __future__ import annotations

import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile

from flexsfl.core.atomic import atomic_path
from flexsfl.core.errors import ConfigError, FlashError

__all__ = ["build_wheel", "wheel_digest"]

log = logging.getLogger("flexsfl.flash")


def _source_root() -> pathlib.Path:
    root = pathlib.Path(__file__).resolve().parents[2]  # flexsfl/deploy/wheel.py -> the checkout
    if not (root / "pyproject.toml").is_file():
        raise ConfigError(
            "flexsfl does not run from a source checkout here (no pyproject.toml next to flexsfl/); "
            "pass --wheel FILE with a flexsfl wheel, or --skip-install"
        )
    return root


def build_wheel(out_dir: str | os.PathLike) -> pathlib.Path:
    """Build this checkout's wheel (``pip wheel --no-deps``) into ``out_dir`` and return its path.

    It builds from a copy of exactly what setuptools packs (the folders pyproject's
    ``tool.setuptools.package-dir`` maps into the ``flexsfl`` namespace), so stale ``build/``
    leftovers in the checkout never reach a device and the checkout is not touched.
    """
    root = _source_root()
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    folders = set(meta.get("tool", {}).get("setuptools", {}).get("package-dir", {}).values())
    readme = meta.get("project", {}).get("readme")
    out_dir = pathlib.Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="flexsfl-wheel-") as tmp:
        src = pathlib.Path(tmp) / "src"
        src.mkdir()
        shutil.copy2(root / "pyproject.toml", src)
        if isinstance(readme, str) and (root / readme).is_file():
            shutil.copy2(root / readme, src)
        for name in sorted(folders):
            shutil.copytree(root / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        log.info("building the flexsfl wheel from %s", root)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(src / "dist"), str(src)],
            capture_output=True, text=True,
        )
        wheels = sorted((src / "dist").glob("flexsfl-*.whl"))
        if proc.returncode != 0 or not wheels:
            last = (proc.stderr.strip() or proc.stdout.strip() or "no wheel written").splitlines()[-1]
            raise FlashError(f"building the flexsfl wheel failed: {last}; fix the build or pass --wheel FILE")
        out_dir.mkdir(parents=True, exist_ok=True)
        target = out_dir / wheels[0].name
        with atomic_path(target) as tmp:
            shutil.copyfile(wheels[0], tmp)
        return target


def wheel_digest(path: str | os.PathLike) -> str:
    """sha256 over a wheel's member names and contents.

    Two builds of the same sources differ in zip timestamps, so the file's own hash would
    reinstall the runtime on every flash; RECORD is left out because it only restates the hashes.
    """
    h = hashlib.sha256()
    try:
        with zipfile.ZipFile(path) as z:
            for name in sorted(z.namelist()):
                if not name.endswith(".dist-info/RECORD"):
                    h.update(name.encode() + b"\0" + hashlib.sha256(z.read(name)).digest())
    except (OSError, zipfile.BadZipFile) as e:
        raise ConfigError(
            f"--wheel {path}: not a readable wheel ({e}); build one with `pip wheel --no-deps .`"
        ) from None
    return h.hexdigest()
