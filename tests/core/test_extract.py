"""The tarball extraction cache: private, keyed by content, bombs and planted directories refused."""

import io
import os
import pathlib
import stat
import struct
import tarfile
import time
import zlib

import pytest

from flexsfl.core.errors import BundleError
from flexsfl.core.extract import cache_dir, extract_tar

MANIFEST = b'{"schema_version": 3}'


def _tar(path: pathlib.Path, files: dict[str, bytes]) -> pathlib.Path:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _bomb(path: pathlib.Path, size: int = 1 << 30) -> pathlib.Path:
    """A valid .tar.gz of ~1 MB that unpacks to ``size`` bytes of zeros, built in about a second.

    Deflate after a full flush starts afresh, so 1 MiB of zeros compresses to the same bytes
    every time: they are repeated instead of compressing a GiB.
    """
    m = tarfile.TarInfo("b/manifest.json")
    m.size = len(MANIFEST)
    z = tarfile.TarInfo("b/zeros.bin")
    z.size = size
    head = m.tobuf() + MANIFEST + bytes(512 - len(MANIFEST)) + z.tobuf()
    tail = size + 1024  # the zeros, then the two zero blocks that end a tar: all zeros
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    chunk = 1 << 20
    body = co.compress(head) + co.flush(zlib.Z_FULL_FLUSH)
    one = co.compress(bytes(chunk)) + co.flush(zlib.Z_FULL_FLUSH)
    assert co.compress(bytes(chunk)) + co.flush(zlib.Z_FULL_FLUSH) == one
    crc = zlib.crc32(head)
    zeros = bytes(chunk)
    for _ in range(tail // chunk):
        crc = zlib.crc32(zeros, crc)
    rest = tail % chunk
    end = co.compress(bytes(rest)) + co.flush(zlib.Z_FINISH)
    crc = zlib.crc32(bytes(rest), crc)
    with open(path, "wb") as f:
        f.write(b"\x1f\x8b\x08\x00" + bytes(4) + b"\x00\xff")  # gzip header: deflate, no name, mtime 0
        f.write(body)
        for _ in range(tail // chunk - 1):
            f.write(one)
        f.write(one + end)
        f.write(struct.pack("<II", crc, (len(head) + tail) & 0xFFFFFFFF))
    return path


def test_cache_is_private_and_keyed_by_content(tmp_path):
    tar = _tar(tmp_path / "b.tar.gz", {"b/manifest.json": MANIFEST, "b/x.bin": b"x" * 10})
    cache = tmp_path / "cache"
    out = extract_tar(tar, "ab" * 32, cache)
    assert out == cache / ("ab" * 32) and (out / "x.bin").read_bytes() == b"x" * 10
    assert [p.name for p in cache.iterdir()] == [out.name]  # no temporary directory left
    assert extract_tar(tar, "ab" * 32, cache) == out  # reused: same manifest
    default = cache_dir()
    assert default.name == f"flexsfl-bundles-{os.getuid()}" and stat.S_IMODE(default.stat().st_mode) == 0o700


def test_loose_cache_directory_is_refused(tmp_path):
    cache = tmp_path / "shared"
    cache.mkdir()
    cache.chmod(0o777)
    with pytest.raises(BundleError, match="not a private directory") as e:
        cache_dir(cache)
    assert len(str(e.value).splitlines()) == 1


def test_planted_directory_is_not_trusted(tmp_path):
    tar = _tar(tmp_path / "b.tar.gz", {"b/manifest.json": MANIFEST, "b/x.bin": b"real"})
    cache = tmp_path / "cache"
    planted = cache / ("cd" * 32)
    planted.mkdir(parents=True)
    (planted / "manifest.json").write_bytes(b'{"evil": 1}')
    (planted / "x.bin").write_bytes(b"evil")
    out = extract_tar(tar, "cd" * 32, cache)
    assert (out / "x.bin").read_bytes() == b"real" and (out / "manifest.json").read_bytes() == MANIFEST
    # A planted symlink in the digest's place is replaced, not followed.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_bytes(b"{}")
    link = cache / ("ef" * 32)
    link.symlink_to(elsewhere)
    out = extract_tar(tar, "ef" * 32, cache)
    assert not out.is_symlink() and (out / "x.bin").read_bytes() == b"real"
    assert (elsewhere / "manifest.json").read_bytes() == b"{}"


def test_tar_bomb_is_refused_with_nothing_left_behind(tmp_path):
    bomb = _bomb(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 2 << 20
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    with pytest.raises(BundleError, match="tar bomb") as e:
        extract_tar(bomb, "00" * 32, cache)
    assert time.perf_counter() - t0 < 5  # refused from the header, not after unpacking
    assert len(str(e.value).splitlines()) == 1 and "bomb.tar.gz" in str(e.value)
    assert list(cache.iterdir()) == []
    # The cap also holds without the ratio rule: a tarball over max_bytes.
    tar = _tar(tmp_path / "big.tar.gz", {"b/manifest.json": MANIFEST, "b/x.bin": b"x" * 5000})
    with pytest.raises(BundleError, match="more than"):
        extract_tar(tar, "11" * 32, cache, max_bytes=4096)
    assert list(cache.iterdir()) == []


def test_truncated_tarball_leaves_nothing(tmp_path):
    tar = _tar(tmp_path / "b.tar.gz", {"b/manifest.json": MANIFEST, "b/x.bin": os.urandom(50_000)})
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(tar.read_bytes()[:20_000])
    cache = tmp_path / "cache"
    with pytest.raises(BundleError, match="not a readable .tar.gz"):
        extract_tar(cut, "22" * 32, cache)
    assert list(cache.iterdir()) == []
