"""``flexsfl flash``: put a verified bundle on an edge device over SSH and run the edge runtime there.

The transport is one OpenSSH connection (:mod:`flexsfl.deploy.ssh`) and, for each step, the
standard-library script :mod:`flexsfl.deploy.flash_remote` run by the device's python3; uploads
are planned and checked by :mod:`flexsfl.deploy.upload`, the runtime wheel comes from
:mod:`flexsfl.deploy.wheel`, the unit from :mod:`flexsfl.deploy.service`. This module runs the
steps, in this order:

1. verify the bundle here (:func:`flexsfl.core.bundle.load_bundle`);
2. probe the device and refuse a wrong architecture, Python, memory or disk *before* copying;
3. send only the files the device has nowhere (the others are hard-linked there) into
   ``DIR/.staging-<sha>``, with a progress bar;
4. verify every sha256 on the device; send the files that do not match once more, then refuse;
5. install the runtime wheel into ``DIR/venv`` if its contents or extra changed;
6. switch ``DIR/current`` atomically; the bundle that was current becomes ``DIR/previous``;
7. write ``DIR/config.json``, ``DIR/token`` and the systemd unit, and (re)start the service.

Whatever fails before step 6, including a connection cut mid-upload, leaves the previous bundle
active and intact; the next flash resumes from the files that did arrive.
"""


from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import posixpath
import re
import tempfile
from collections.abc import Callable

from flexsfl.core.bundle import Manifest, load_bundle, sha256_file
from flexsfl.core.errors import ConfigError, FlashError
from flexsfl.core.wire import CLIENT_ID_RE
from flexsfl.deploy import flash_remote
from flexsfl.deploy.checks import check_device, check_disk, venv_disk_mb
from flexsfl.deploy.service import UNIT_NAME, follow_logs, render_unit
from flexsfl.deploy.ssh import SAFE_PATH, Remote, Session
from flexsfl.deploy.upload import Plan, Progress, bundle_plan, send
from flexsfl.deploy.wheel import build_wheel, wheel_digest

__all__ = ["EXTRAS", "ClientSettings", "DeviceInfo", "FlashReport", "flash", "rollback"]

log = logging.getLogger("flexsfl.flash")

EXTRAS = {"ort": "edge", "executorch": "edge-executorch"}  # pyproject extra per backend
_MB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ClientSettings:
    """What the device's ``config.json`` gets besides the bundle path. ``None`` keeps the device's value."""

    server: str | None = None  # ws:// or wss:// URL of `flexsfl serve`
    client_id: str | None = None
    token_file: str | None = None  # a file HERE holding the client's token; copied to DIR/token (0600)
    data: str | None = None  # the data set's path ON THE DEVICE (relative: under DIR); it must exist there
    backend: str | None = None  # "ort" or "executorch"; None: the target's preferred one if the bundle has it
    threads: int | None = None  # intra-op threads of the runtime; None: the runtime decides

    def __post_init__(self) -> None:
        if self.server is not None and not re.fullmatch(r"wss?://\S+", self.server):
            raise ConfigError(f"--server {self.server!r}: give the server's ws:// or wss:// URL")
        if self.client_id is not None and not CLIENT_ID_RE.fullmatch(self.client_id):
            # The wire's rule: an id the server would refuse in Hello is refused here, before flashing.
            raise ConfigError(f"--client-id {self.client_id!r}: use 1-128 letters, digits, '.', '_' or '-' "
                              "(starting with a letter or digit)")
        if self.data is not None and not SAFE_PATH.fullmatch(self.data):
            raise ConfigError(f"--data {self.data!r}: the path may only hold letters, digits and ._/~+@-")
        if self.backend is not None and self.backend not in EXTRAS:
            raise ConfigError(f"--backend {self.backend!r}: choose one of {', '.join(EXTRAS)}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"--threads {self.threads}: must be at least 1")

    @property
    def given(self) -> bool:
        """Whether any connection setting was given (then the merged config must be complete)."""
        return any(v is not None for v in (self.server, self.client_id, self.token_file, self.data))

    def read_token(self) -> str | None:
        if self.token_file is None:
            return None
        try:
            token = pathlib.Path(self.token_file).read_text().strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--token-file {self.token_file}: cannot read it ({e.__class__.__name__})") from None
        if not token or "\n" in token:
            raise ConfigError(f"--token-file {self.token_file}: must hold the token on one line")
        return token



@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What the probe found on the device, before the flash changed anything."""

    arch: str
    python: str  # "3.11.2"
    python_path: str
    memory_mb: int
    free_mb: int  # free space on DIR's file system
    cores: int
    user: str
    root: bool
    systemd: bool  # systemd runs there (PID 1)
    directory: str  # DIR, absolute

    @classmethod
    def from_probe(cls, d: dict) -> DeviceInfo:
        return cls(
            arch=d["arch"], python=".".join(map(str, d["python"])), python_path=d["python_path"],
            memory_mb=d["memory"] // _MB, free_mb=d["free"] // _MB, cores=d["cores"], user=d["user"],
            root=d["uid"] == 0, systemd=d["systemd"], directory=d["dir"],
        )


@dataclasses.dataclass(frozen=True)
class FlashReport:
    """What a flash (or rollback) did, or with ``dry_run`` would do."""

    remote: str
    device: DeviceInfo
    bundle: str | None  # manifest sha256 of the flashed bundle: DIR/bundles/<bundle>
    current: str | None  # the bundle DIR/current names afterwards
    previous: str | None
    uploaded: tuple[str, ...] = ()  # bundle files sent over the network
    upload_bytes: int = 0
    reused: tuple[str, ...] = ()  # bundle files found on the device (linked, resumed, or in place)
    verified: int = 0  # files whose sha256 the device checked
    retried: tuple[str, ...] = ()  # files sent again after a sha256 mismatch
    runtime: str = ""  # one line: what happened to DIR/venv
    config: str | None = None  # config.json on the device, if written
    unit: str | None = None  # the unit file on the device, if written
    service: str = ""  # one line: what happened to the service
    commands: tuple[str, ...] = ()  # for the person to run next
    notes: tuple[str, ...] = ()
    dry_run: bool = False

    def summary(self) -> str:
        d = self.device
        lines = [
            f"device   {self.remote.rpartition(':')[0]} ({d.arch}, Python {d.python}, {d.memory_mb} MB RAM, "
            f"{d.cores} cores, {d.free_mb} MB free)",
            f"dir      {d.directory}",
        ]
        if self.bundle is not None:
            sent = f"{len(self.uploaded)} files, {_size(self.upload_bytes)}" if self.uploaded else "nothing"
            lines.append(f"upload   {sent} {'to send' if self.dry_run else 'sent'}; {len(self.reused)} files "
                         "already on the device")
            if self.retried:
                lines.append(f"retried  {', '.join(self.retried)} (sha256 mismatch after the first upload)")
            if not self.dry_run:
                lines.append(f"verified {self.verified} files by sha256 on the device")
        lines.append(f"active   current -> {_short(self.current)}, previous -> {_short(self.previous)}")
        if self.runtime:
            lines.append(f"runtime  {self.runtime}")
        if self.config:
            lines.append(f"config   {self.config}")
        if self.service:
            lines.append(f"service  {self.service}")
        lines += [f"note     {n}" for n in self.notes]
        lines += [f"run      {c}" for c in self.commands]
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _short(sha: str | None) -> str:
    return f"bundles/{sha[:16]}" if sha else "(none)"



def _choose_backend(manifest: Manifest, requested: str | None) -> str:
    if requested is not None:
        if requested not in manifest.backend:
            raise ConfigError(
                f"--backend {requested}: the bundle holds {', '.join(manifest.backend)}; export it with "
                f"--backend {requested}"
            )
        return requested
    preferred = manifest.target.preferred_backend
    return preferred if preferred in manifest.backend else manifest.backend[0]



def _client_config(remote: Remote, dev: dict, settings: ClientSettings, backend: str, token: str | None) -> dict | None:
    """The device's config.json after this flash, or None if it cannot be complete yet."""
    root = dev["dir"]
    old = dev["config"] if isinstance(dev["config"], dict) else {}
    # The personal adapters live outside bundles/, so switching or pruning bundles never loses them.
    cfg = {"state_dir": posixpath.join(root, flash_remote.STATE), **old,
           "bundle": posixpath.join(root, flash_remote.CURRENT), "backend": backend}
    for key, value in (("server", settings.server), ("client_id", settings.client_id), ("threads", settings.threads)):
        if value is not None:
            cfg[key] = value
    if token is not None or dev["token"]:
        cfg["token_file"] = posixpath.join(root, flash_remote.TOKEN)
    if settings.data is not None:
        cfg["data"] = dev["data"]["path"]
    missing = [k for k in ("server", "client_id", "token_file", "data") if not cfg.get(k)]
    if not missing:
        return cfg
    if settings.given:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in missing)
        raise ConfigError(
            f"{remote}: the client config needs {flags} too (the device has no config.json with them yet)"
        )
    return None


def _remote_dir(remote: Remote, dev: dict) -> Remote:
    """``remote`` with DIR made absolute as the device resolved it, so every later step agrees."""
    return dataclasses.replace(remote, directory=dev["dir"])


def flash(
    bundle: str | os.PathLike,
    destination: str | Remote,
    *,
    settings: ClientSettings = ClientSettings(),
    python: str = "python3",
    wheel: str | os.PathLike | None = None,
    install: bool = True,
    service: bool = True,
    dry_run: bool = False,
    on_progress: Callable[[Progress], None] | None = None,
) -> FlashReport:
    """Flash ``bundle`` (directory or .tar.gz) to ``destination`` (``user@host[:DIR]`` or a :class:`Remote`).

    ``python``: the device's interpreter that runs the steps and creates the venv. ``wheel``: the
    flexsfl wheel to install (default: built from this checkout); ``install=False`` leaves
    DIR/venv alone. ``service=False`` writes the config but no unit. ``dry_run`` probes, checks
    and plans, and changes nothing on the device. ``on_progress`` sees every upload's bytes.

    Raises :class:`ConfigError` for bad arguments and :class:`FlashError` for everything met on
    the way; both before the switch of DIR/current leave the previous bundle active.
    """
    remote = destination if isinstance(destination, Remote) else Remote.parse(destination)
    loaded = load_bundle(bundle)
    manifest, sha = loaded.manifest, loaded.manifest_sha256
    backend = _choose_backend(manifest, settings.backend)
    extra = EXTRAS[backend]
    token = settings.read_token()
    with tempfile.TemporaryDirectory(prefix="flexsfl-flash-") as tmp, Session(remote, python) as session:
        log.info("probing %s", remote.login)
        dev = session.call("probe", {"dir": remote.directory, "bundle": sha, "data": settings.data})
        session.remote = remote = _remote_dir(remote, dev)
        device = DeviceInfo.from_probe(dev)
        check_device(remote, manifest, dev, install)
        if settings.data is not None and not dev["data"]["exists"]:
            raise FlashError(
                f"{remote}: --data {dev['data']['path']} does not exist on the device; copy it there first "
                f"(scp FILE {remote.login}:{dev['data']['path']}) or fix --data"
            )
        config = _client_config(remote, dev, settings, backend, token)
        plan = bundle_plan(loaded, dev)
        upload_bytes = sum((loaded.root / rel).stat().st_size for rel in plan.upload)

        runtime_plan = None
        venv_mb = 0
        if install:
            local_wheel = pathlib.Path(wheel) if wheel is not None else build_wheel(tmp)
            digest = wheel_digest(local_wheel)
            old = dev["runtime"] or {}
            if (old.get("digest"), old.get("extra")) != (digest, extra):
                runtime_plan = Plan({local_wheel.name: sha256_file(local_wheel)}, "wheels", "wheels",
                                     (local_wheel.name,), {}, ())
                venv_mb = venv_disk_mb(backend, dev["arch"]) if old.get("extra") != extra else 0
        check_disk(remote, dev, upload_bytes, venv_mb)

        unit_text = render_unit(dev["dir"], user=dev["user"], system=device.root) if service and config else None
        run_cmd = f"{dev['dir']}/venv/bin/flexsfl edge run --config {dev['dir']}/{flash_remote.CONFIG}"
        notes = _notes(dev, config, install)
        if install:
            state = ("would install" if dry_run else "installed") if runtime_plan else "up to date"
            runtime = f"flexsfl[{extra}] in {dev['dir']}/venv: {state}"
        else:
            runtime = "left alone (--skip-install)"
        report = FlashReport(
            remote=str(remote), device=device, bundle=sha, current=dev["current"], previous=dev["previous"],
            uploaded=plan.upload, upload_bytes=upload_bytes, reused=plan.reused, runtime=runtime, notes=notes,
        )
        if dry_run:
            return dataclasses.replace(report, dry_run=True, service=f"would write {UNIT_NAME}" if unit_text else "")

        if plan.upload:
            log.info("sending %d files (%s); %d already on the device", len(plan.upload), _size(upload_bytes),
                     len(plan.reused))
        else:
            log.info("nothing to send: checking the %d files on the device", len(plan.reused))
        verified_in, retried, verified = send(session, loaded.root, plan, "bundle", on_progress)
        if runtime_plan is not None:
            log.info("installing flexsfl[%s] into %s/venv (pip on the device; minutes on a Pi)", extra, dev["dir"])
            send(session, local_wheel.parent, runtime_plan, "runtime wheel", on_progress)
            session.call("install", {"dir": remote.directory, "wheel": f"wheels/{local_wheel.name}",
                                     "extra": extra, "digest": digest}, what="the runtime install")
        act = session.call("activate", {"dir": remote.directory, "bundle": sha,
                                        "staged": verified_in == plan.staging})
        if act["removed"]:
            log.info("pruned %s from %s/bundles", ", ".join(b[:16] for b in act["removed"]), dev["dir"])
        conf = session.call("configure", {
            "dir": remote.directory, "config": config, "token": token, "unit": unit_text,
            "changed": act["switched"] or runtime_plan is not None,
        })
    return dataclasses.replace(
        report,
        current=act["current"], previous=act["previous"],
        uploaded=tuple(dict.fromkeys((*plan.upload, *retried))),
        upload_bytes=upload_bytes + sum((loaded.root / rel).stat().st_size for rel in retried),
        verified=verified, retried=retried,
        config=posixpath.join(dev["dir"], flash_remote.CONFIG) if config else None,
        unit=conf["unit"],
        **_service_outcome(conf, device, run_cmd, service),
    )


def _notes(dev: dict, config: dict | None, install: bool) -> tuple[str, ...]:
    notes = []
    if config is None:
        notes.append(
            "no client config yet: flash again with --server URL --client-id ID --token-file F --data PATH "
            "to write config.json and install the service"
        )
    if not install and dev["runtime"] is None:
        notes.append(f"no runtime in {dev['dir']}/venv; flash without --skip-install to install it")
    return tuple(notes)


def _service_outcome(conf: dict, device: DeviceInfo, run_cmd: str, service: bool) -> dict:
    """The report's service line and the commands for the person, from the configure step's reply."""
    if conf["unit"] is None:  # --no-service, or no complete config yet (a note says so)
        return {"service": "not installed (--no-service)", "commands": (run_cmd,)} if not service else {}
    unit = f"{UNIT_NAME} ({'system' if device.root else 'user'} unit {conf['unit']})"
    if conf["started"]:
        verb = "restarted" if conf["changed"] else "running"
        return {"service": f"{unit} enabled, {verb}", "commands": (follow_logs(device.root),)}
    if conf["error"]:
        return {"service": f"{unit} written, not started: {conf['error']}",
                "commands": (" && ".join(conf["commands"]), run_cmd)}
    return {"service": f"{unit} written, not started: systemd is not running on the device", "commands": (run_cmd,)}


def rollback(destination: str | Remote, *, python: str = "python3") -> FlashReport:
    """Switch DIR/current back to DIR/previous (and previous to what was current); restart the service."""
    remote = destination if isinstance(destination, Remote) else Remote.parse(destination)
    with Session(remote, python) as session:
        dev = session.call("probe", {"dir": remote.directory})
        session.remote = remote = _remote_dir(remote, dev)
        result = session.call("rollback", {"dir": remote.directory})
    device = DeviceInfo.from_probe(dev)
    if result["restarted"]:
        service, commands = f"{UNIT_NAME} restarted", (follow_logs(device.root),)
    elif result["error"]:
        service, commands = f"not restarted: {result['error']}", ()
    else:
        service, commands = "not restarted (no unit, or systemd is not running)", ()
    return FlashReport(remote=str(remote), device=device, bundle=None, current=result["current"],
                       previous=result["previous"], service=service, commands=commands)

