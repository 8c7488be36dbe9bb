"""Getting a set of files onto the device: what to send, link or keep (:func:`bundle_plan`), then
sending it as one tar stream with progress and checking every sha256 there (:func:`send`)."""

from __future__ import annotations

import dataclasses
import logging
import pathlib
import posixpath
import tarfile
import time
from collections.abc import Callable, Iterable
from typing import BinaryIO

from flexsfl.core.bundle import MANIFEST_NAME, Bundle
from flexsfl.core.errors import FlashError
from flexsfl.deploy import flash_remote
from flexsfl.deploy.ssh import Session

__all__ = ["Progress", "Plan", "bundle_plan", "send"]

log = logging.getLogger("flexsfl.flash")

_MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class Progress:
    """An upload's progress: ``done`` of ``total`` bytes of ``label`` sent; ``path`` is being sent now."""

    label: str  # "bundle", "bundle (retry)" or "runtime wheel"
    path: str
    done: int
    total: int



class _Counting:
    """A file whose reads are reported to ``on_read``: tarfile reads what it sends through this."""

    def __init__(self, f: BinaryIO, on_read: Callable[[int], None]) -> None:
        self._f, self._on_read = f, on_read

    def read(self, n: int = -1) -> bytes:
        block = self._f.read(n)
        self._on_read(len(block))
        return block


def _tar_payload(root: pathlib.Path, rels: Iterable[str], label: str,
                 on_progress: Callable[[Progress], None] | None) -> Callable[[BinaryIO], None]:
    """A payload that streams ``rels`` (paths under ``root``) as a tar, reporting progress per MB."""
    rels = list(rels)

    def write(pipe: BinaryIO) -> None:
        sizes = {rel: (root / rel).stat().st_size for rel in rels}
        total, done = sum(sizes.values()), 0
        with tarfile.open(fileobj=pipe, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            tar.copybufsize = _MB
            for rel in rels:
                info = tarfile.TarInfo(rel)
                info.size, info.mode, info.mtime = sizes[rel], 0o644, int(time.time())

                def sent(n: int, rel: str = rel) -> None:
                    nonlocal done
                    done += n
                    if on_progress is not None:
                        on_progress(Progress(label, rel, done, total))

                with open(root / rel, "rb") as f:
                    tar.addfile(info, _Counting(f, sent))

    return write



@dataclasses.dataclass(frozen=True)
class Plan:
    """How a set of files gets onto the device."""

    files: dict[str, str]  # rel -> sha256 of every file that must end up there
    into: str  # where they are verified, relative to DIR: the staging directory, or where they already are
    staging: str  # where uploads and links go, relative to DIR
    upload: tuple[str, ...]  # sent over the network
    links: dict[str, str]  # rel -> absolute path of an identical file already on the device
    kept: tuple[str, ...]  # already in place

    @property
    def reused(self) -> tuple[str, ...]:
        return tuple(sorted((*self.links, *self.kept)))


def bundle_plan(bundle: Bundle, dev: dict) -> Plan:
    """Send only what the device has nowhere: a file with the same sha256 in a bundle already
    there is hard-linked, and complete files of an interrupted upload of this bundle are kept."""
    sha = bundle.manifest_sha256
    files = {**bundle.manifest.files, MANIFEST_NAME: sha}
    staging = f"{flash_remote.STAGING_PREFIX}{sha}"
    if sha in dev["bundles"]:  # re-flash: verify the copy that is there
        return Plan(files, f"{flash_remote.BUNDLES}/{sha}", staging, (), {}, tuple(sorted(files)))
    there = {
        digest: posixpath.join(dev["dir"], flash_remote.BUNDLES, other, rel)
        for other, listed in dev["bundles"].items()
        for rel, digest in listed.items()
    }
    kept = tuple(sorted(rel for rel, digest in files.items() if dev["staging"].get(rel) == digest))
    links = {rel: there[digest] for rel, digest in files.items() if rel not in kept and digest in there}
    # The manifest goes last: a staging directory holding it has received everything before it.
    upload = tuple(sorted(rel for rel in files if rel not in kept and rel not in links and rel != MANIFEST_NAME))
    if MANIFEST_NAME not in kept:
        upload += (MANIFEST_NAME,)
    return Plan(files, staging, staging, upload, links, kept)


def send(session: Session, root: pathlib.Path, plan: Plan, label: str,
          on_progress: Callable[[Progress], None] | None) -> tuple[str, tuple[str, ...], int]:
    """Put ``plan`` on the device and verify it there; a mismatch is sent once more, then refused.

    Returns (where the verified files are, relative to DIR; the files sent again; files checked).
    """
    req = {"dir": session.remote.directory}
    if plan.upload or plan.links:
        session.call("receive", {**req, "into": plan.staging, "links": plan.links},
                     _tar_payload(root, plan.upload, label, on_progress), what=f"the {label} upload")
    into = plan.into
    checked = session.call("verify", {**req, "in": into, "files": plan.files, "delete_bad": into == plan.staging})
    if not checked["bad"]:
        return into, (), checked["checked"]
    bad = tuple(checked["bad"])
    log.warning("sha256 mismatch on the device for %s; sending it again", ", ".join(bad))
    # Files verified where they are (a bundle already on the device) are linked into staging.
    links = {} if into == plan.staging else {
        rel: posixpath.join(session.remote.directory, into, rel) for rel in plan.files if rel not in bad
    }
    session.call("receive", {**req, "into": plan.staging, "links": links},
                 _tar_payload(root, bad, f"{label} (retry)", on_progress), what=f"the {label} upload")
    checked = session.call("verify", {**req, "in": plan.staging, "files": plan.files, "delete_bad": True})
    if checked["bad"]:
        raise FlashError(
            f"{session.remote}: sha256 mismatch on the device for {', '.join(checked['bad'])} after the upload "
            "and one retry; the previous bundle is still active; check the device's storage (dmesg, free "
            "space) and the bundle here, then flash again"
        )
    return plan.staging, bad, checked["checked"]
