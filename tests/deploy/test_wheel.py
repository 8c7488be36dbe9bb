"""flexsfl.deploy.wheel: the runtime wheel holds only the flexsfl namespace; its digest follows contents."""

from __future__ import annotations

import hashlib
import pathlib
import zipfile

from flexsfl.deploy.wheel import wheel_digest


def test_wheel_digest_follows_contents_not_timestamps(wheel, tmp_path):
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist()}
        assert "flexsfl/deploy/flash_remote.py" in names and "flexsfl/edge_runtime/trainer.py" in names
        tops = {n.split("/")[0] for n in names}
        assert all(t == "flexsfl" or t.startswith("flexsfl-") for t in tops), sorted(tops)
        assert not any("__pycache__" in n for n in names)

    def rewrite(out: pathlib.Path, change: str | None) -> pathlib.Path:
        with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(out, "w") as dst:
            for info in src.infolist():
                data = src.read(info)
                info.date_time = (2030, 1, 1, 0, 0, 0)
                dst.writestr(info, data + b"# changed\n" if info.filename == change else data)
        return out

    same = rewrite(tmp_path / "same.whl", None)
    assert hashlib.sha256(same.read_bytes()).digest() != hashlib.sha256(wheel.read_bytes()).digest()
    assert wheel_digest(same) == wheel_digest(wheel)
    assert wheel_digest(rewrite(tmp_path / "other.whl", "flexsfl/deploy/flash.py")) != wheel_digest(wheel)

