"""The device side of ``flexsfl flash``: a standard-library-only script run by the device's python3.

:mod:`flexsfl.deploy.flash` sends this file's source as ``python3 -c SOURCE`` over SSH, so nothing has to
be installed on the device first and no helper file is left behind. Each run does one operation:

- stdin: one JSON line ``{"op": NAME, ...}``, then the operation's payload (``receive``: a tar
  stream of the files to write);
- stdout: one JSON line, ``{"ok": true, ...}`` or ``{"ok": false, "error": "one line"}``;
- stderr: progress for a person (pip's output during ``install``).

The device directory DIR holds::

    DIR/bundles/<manifest-sha256>/   verified bundles: the current one and the previous one
    DIR/current -> bundles/<sha>     the bundle the runtime loads (switched by an atomic rename)
    DIR/previous -> bundles/<sha>    what ``--rollback`` switches back to
    DIR/.staging-<sha>/              an upload in progress (only complete files carry their name)
    DIR/venv/                        the edge runtime; venv/.flexsfl-wheel.json says which wheel
    DIR/config.json, DIR/token       what ``flexsfl edge run --config DIR/config.json`` reads
    DIR/state/                       the runtime's personal adapters; no flash touches it

A bundle directory under ``bundles/`` only ever appears by renaming a staging directory whose
every sha256 was checked, so ``current`` and ``previous`` always name complete bundles; an upload
that dies half-way leaves a staging directory that the next flash resumes or removes.

The device may run an older Python than ours, so the syntax stays within Python 3.6: the probe must
get far enough to say "Python 3.9 is too old" instead of failing with a SyntaxError.
"""

import fcntl
import hashlib
import importlib.util
import json
import os
import pwd
import shutil
import struct
import subprocess
import sys
import tarfile

__all__ = ["main"]

BUNDLES = "bundles"
CURRENT = "current"
PREVIOUS = "previous"
STAGING_PREFIX = ".staging-"
MANIFEST = "manifest.json"
VENV = "venv"
WHEEL_MARKER = ".flexsfl-wheel.json"
CONFIG = "config.json"
TOKEN = "token"
STATE = "state"
UNIT_NAME = "flexsfl-edge.service"
_CHUNK = 1 << 20


class RemoteError(Exception):
    """A refusal to report to the workstation as one line."""


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _is_sha(name):
    return len(name) == 64 and all(c in "0123456789abcdef" for c in name)


def _safe_join(root, rel):
    parts = rel.split("/")
    if rel.startswith("/") or not rel or any(p in ("", ".", "..") for p in parts):
        raise RemoteError(f"refusing path {rel!r}: it escapes the bundle directory")
    return os.path.join(root, *parts)


def _root(req):
    """DIR as an absolute path; a relative DIR is under the login user's home."""
    return os.path.abspath(os.path.join(os.path.expanduser("~"), os.path.expanduser(req["dir"])))


def _link_target(root, name):
    """The bundle sha a DIR/current or DIR/previous link names, or None."""
    path = os.path.join(root, name)
    if not os.path.islink(path):
        return None
    target = os.path.basename(os.readlink(path))
    return target if os.path.isfile(os.path.join(root, BUNDLES, target, MANIFEST)) else None


def _write_atomic(path, data, mode=0o644):
    """Write ``data`` to ``path`` through a temporary file and a rename, with ``mode`` from the start."""
    tmp = path + ".tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode), "wb") as f:
        os.fchmod(f.fileno(), mode)  # the umask must not narrow it
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _set_link(root, name, sha):
    """Point DIR/<name> at bundles/<sha>: a new link renamed over the old one, never a moment without."""
    tmp = os.path.join(root, "." + name + ".tmp")
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(os.path.join(BUNDLES, sha), tmp)
    os.replace(tmp, os.path.join(root, name))


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Lock:
    """flock on DIR/.lock so two flashes never interleave their link switches."""

    def __init__(self, root):
        os.makedirs(root, exist_ok=True)
        self.fd = os.open(os.path.join(root, ".lock"), os.O_WRONLY | os.O_CREAT, 0o644)

    def __enter__(self):
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RemoteError("another flash is switching bundles in this directory; wait for it and retry") from None
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _existing(path):
    """``path`` or its nearest existing ancestor: where DIR would be created."""
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def _memory_bytes():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _read_text(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def _read_json(path):
    text = _read_text(path)
    try:
        return None if text is None else json.loads(text)
    except ValueError:
        return None


def op_probe(req):
    """Facts the workstation checks before it copies anything. Changes nothing on the device."""
    root = _root(req)
    bundles = {}
    bdir = os.path.join(root, BUNDLES)
    if os.path.isdir(bdir):
        for sha in sorted(filter(_is_sha, os.listdir(bdir))):
            man = _read_json(os.path.join(bdir, sha, MANIFEST))
            if isinstance(man, dict) and isinstance(man.get("files"), dict):
                bundles[sha] = man["files"]
    # Complete files of an interrupted upload of this very bundle: hashed here because nothing
    # has checked them yet; the next upload skips the ones that are right.
    staging = {}
    sdir = os.path.join(root, STAGING_PREFIX + req["bundle"]) if req.get("bundle") else None
    for dirpath, _, names in os.walk(sdir) if sdir else ():
        for name in names:
            if not name.endswith(".part"):
                path = os.path.join(dirpath, name)
                staging[os.path.relpath(path, sdir).replace(os.sep, "/")] = _sha256(path)
    venv_python = os.path.join(root, VENV, "bin", "python")
    data = os.path.join(root, os.path.expanduser(req["data"])) if req.get("data") else None
    uid = os.geteuid()
    disk = os.statvfs(_existing(root))
    return {
        "arch": os.uname().machine,
        "python": list(sys.version_info[:3]),
        "python_path": sys.executable,
        "python_bits": struct.calcsize("P") * 8,
        "venv_ok": all(importlib.util.find_spec(m) is not None for m in ("venv", "ensurepip")),
        "user": pwd.getpwuid(uid).pw_name,
        "uid": uid,
        "dir": root,
        "free": disk.f_bavail * disk.f_frsize,
        "writable": os.access(_existing(root), os.W_OK),
        "memory": _memory_bytes(),
        "cores": os.cpu_count() or 1,
        "systemd": os.path.isdir("/run/systemd/system"),
        "current": _link_target(root, CURRENT),
        "previous": _link_target(root, PREVIOUS),
        "bundles": bundles,
        "staging": staging,
        "runtime": _read_json(os.path.join(root, VENV, WHEEL_MARKER)) if os.path.exists(venv_python) else None,
        "config": _read_json(os.path.join(root, CONFIG)),
        "token": os.path.isfile(os.path.join(root, TOKEN)),
        "data": {"path": data, "exists": os.path.exists(data)} if data else None,
    }


def op_receive(req, stream):
    """Fill DIR/``req["into"]``: hard-link ``req["links"]`` (rel -> existing file), then write the tar stream.

    Every file is written as ``name.part``, synced, then renamed, so a file with its final name
    is always complete; a dropped connection leaves at most one ``.part`` behind.
    """
    dest = os.path.join(_root(req), req["into"])
    os.makedirs(dest, exist_ok=True)
    for dirpath, _, names in os.walk(dest):
        for name in names:
            if name.endswith(".part"):
                os.unlink(os.path.join(dirpath, name))
    for rel, src in sorted(req.get("links", {}).items()):
        path = _safe_join(dest, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.lexists(path):
            os.unlink(path)
        try:
            os.link(src, path)
        except OSError:  # a file system without hard links (FAT on an SD card): copy instead
            shutil.copyfile(src, path + ".part")
            os.replace(path + ".part", path)
    written, total = [], 0
    with tarfile.open(fileobj=stream, mode="r|") as tar:
        for member in tar:
            if not member.isfile():
                raise RemoteError(f"refusing {member.name!r} in the upload: not a regular file")
            path = _safe_join(dest, member.name)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            src = tar.extractfile(member)
            with open(path + ".part", "wb") as out:
                block = src.read(_CHUNK)
                while block:
                    out.write(block)
                    block = src.read(_CHUNK)
                out.flush()
                os.fsync(out.fileno())
            os.replace(path + ".part", path)
            written.append(member.name)
            total += member.size
    return {"written": written, "bytes": total}


def op_verify(req):
    """sha256 of every file in ``req["files"]`` (rel -> sha256) under ``req["in"]``, read back from disk.

    With ``req["delete_bad"]`` the files that do not match are removed, so the next upload
    replaces them instead of resuming from them.
    """
    where = os.path.join(_root(req), req["in"])
    bad = []
    for rel, digest in sorted(req["files"].items()):
        path = _safe_join(where, rel)
        if not os.path.isfile(path) or _sha256(path) != digest:
            bad.append(rel)
            if req.get("delete_bad") and os.path.lexists(path):
                os.unlink(path)
    return {"bad": bad, "checked": len(req["files"])}


def op_activate(req):
    """Make bundles/<sha> current (with ``staged``, moving the verified staging directory there first).

    ``previous`` becomes the bundle that was current; every other bundle and staging directory
    is removed so the device keeps two bundles at most.
    """
    root, sha = _root(req), req["bundle"]
    bdir = os.path.join(root, BUNDLES)
    target = os.path.join(bdir, sha)
    staging = os.path.join(root, STAGING_PREFIX + sha)
    with _Lock(root):
        os.makedirs(bdir, exist_ok=True)
        if req["staged"]:
            if os.path.isdir(target):
                # Repairing a damaged copy of this bundle: two renames, since no rename swaps
                # directories; `current` dangles between them only if it named the damaged copy.
                old = os.path.join(bdir, ".old-" + sha)
                os.rename(target, old)
                os.rename(staging, target)
                shutil.rmtree(old)
            else:
                os.rename(staging, target)
        cur = _link_target(root, CURRENT)
        if cur != sha:
            if cur is not None:
                _set_link(root, PREVIOUS, cur)
            _set_link(root, CURRENT, sha)
        _fsync_dir(root)
        keep = {_link_target(root, CURRENT), _link_target(root, PREVIOUS)}
        removed = []
        for name in sorted(os.listdir(bdir)):
            # Only what a flash put there: whatever else someone keeps in bundles/ stays.
            if name not in keep and (_is_sha(name) or name.startswith(".old-")):
                shutil.rmtree(os.path.join(bdir, name))
                removed.append(name)
        for name in sorted(os.listdir(root)):
            if name.startswith(STAGING_PREFIX):
                shutil.rmtree(os.path.join(root, name))
    return {"current": _link_target(root, CURRENT), "previous": _link_target(root, PREVIOUS),
            "switched": cur != sha, "removed": removed}


def op_rollback(req):
    """Swap ``current`` and ``previous``, then restart the service if it runs under systemd."""
    root = _root(req)
    if not os.path.isdir(root):
        raise RemoteError(f"{root} does not exist: nothing was flashed there")
    with _Lock(root):
        cur, prev = _link_target(root, CURRENT), _link_target(root, PREVIOUS)
        if prev is None:
            raise RemoteError(f"no previous bundle in {root} to roll back to")
        # current first: if we die between the two renames, the rollback has still happened.
        _set_link(root, CURRENT, prev)
        if cur is not None:
            _set_link(root, PREVIOUS, cur)
        _fsync_dir(root)
    restarted, error = False, None
    if os.path.isdir("/run/systemd/system") and os.path.isfile(_unit_path()):
        error = _run_systemctl([_systemctl("try-restart", UNIT_NAME)])
        restarted = error is None
    return {"current": prev, "previous": cur, "restarted": restarted, "error": error}


def _run(cmd, stream=False):
    """Run ``cmd``; with ``stream`` its output goes to our stderr (the person watching)."""
    if stream:
        proc = subprocess.run(cmd, stdout=sys.stderr.fileno(), stderr=subprocess.STDOUT)
        out = ""
    else:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
        out = proc.stdout.strip()
    if proc.returncode != 0:
        last = out.splitlines()[-1] if out else f"exit status {proc.returncode}"
        raise RemoteError("`{}` failed on the device: {}".format(" ".join(cmd), last))
    return out


def op_install(req):
    """Install ``req["wheel"]`` with extra ``req["extra"]`` into DIR/venv with this python, then record it.

    A venv built for another extra is recreated (``--clear``) so it holds only what this
    backend needs; the marker is written last, so a failed install is retried next time.
    """
    root = _root(req)
    venv = os.path.join(root, VENV)
    wheel = os.path.join(root, req["wheel"])
    marker = os.path.join(venv, WHEEL_MARKER)
    old = _read_json(marker)
    python = os.path.join(venv, "bin", "python")
    if not (isinstance(old, dict) and old.get("extra") == req["extra"] and os.path.exists(python)):
        _run([sys.executable, "-m", "venv", "--clear", venv], stream=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "--no-input", "install"]
    _run(pip + ["{}[{}]".format(wheel, req["extra"])], stream=True)
    # Same version, other contents: pip calls that "already satisfied", so replace it outright.
    _run(pip + ["--no-deps", "--force-reinstall", wheel], stream=True)
    _run([os.path.join(venv, "bin", "flexsfl"), "edge", "run", "--help"])  # the command the unit runs
    _write_atomic(marker, json.dumps({"digest": req["digest"], "extra": req["extra"],
                                      "wheel": os.path.basename(wheel)}).encode())
    os.unlink(wheel)
    return {"venv": venv}


def _run_systemctl(commands):
    """Run service commands; return None, or the one-line failure.

    A failure is reported, not raised: by now the bundle is switched, and that stands.
    """
    if os.geteuid() != 0 and "XDG_RUNTIME_DIR" not in os.environ:
        os.environ["XDG_RUNTIME_DIR"] = f"/run/user/{os.geteuid()}"  # where `systemctl --user` finds the manager
    try:
        for cmd in commands:
            _run(cmd)
    except RemoteError as e:
        return str(e)
    return None


def _unit_path():
    if os.geteuid() == 0:
        return os.path.join("/etc/systemd/system", UNIT_NAME)
    return os.path.join(os.path.expanduser("~"), ".config", "systemd", "user", UNIT_NAME)


def _systemctl(*args):
    return ["systemctl"] + ([] if os.geteuid() == 0 else ["--user"]) + list(args)


def op_configure(req):
    """Write config.json, the token (0600) and the unit; under systemd, enable and (re)start the service.

    Without systemd nothing is started; the reply carries the commands to run instead. The
    service restarts when anything it reads changed (``req["changed"]``: the bundle or venv).
    """
    root = _root(req)
    os.makedirs(root, exist_ok=True)
    changed = bool(req.get("changed"))
    if req.get("token") is not None:
        path = os.path.join(root, TOKEN)
        changed |= _read_text(path) != req["token"]
        _write_atomic(path, req["token"].encode(), mode=0o600)
    if req.get("config") is not None:
        text = json.dumps(req["config"], indent=2, sort_keys=True) + "\n"
        path = os.path.join(root, CONFIG)
        changed |= _read_json(path) != req["config"]
        _write_atomic(path, text.encode())
    unit = None
    if req.get("unit") is not None:
        unit = _unit_path()
        os.makedirs(os.path.dirname(unit), exist_ok=True)
        changed |= _read_text(unit) != req["unit"]
        _write_atomic(unit, req["unit"].encode())
    systemd = os.path.isdir("/run/systemd/system")
    commands = []
    if unit is not None:
        if os.geteuid() != 0:
            # Without lingering, a user's services stop at logout and do not start at boot.
            commands.append(["loginctl", "enable-linger", pwd.getpwuid(os.geteuid()).pw_name])
        commands += [_systemctl("daemon-reload"), _systemctl("enable", UNIT_NAME),
                     _systemctl("restart" if changed else "start", UNIT_NAME)]
    started, error = False, None
    if unit is not None and systemd:
        error = _run_systemctl(commands)
        started = error is None
    return {"unit": unit, "systemd": systemd, "started": started, "error": error, "changed": changed,
            "commands": [" ".join(c) for c in commands]}


_OPS = {"probe": op_probe, "verify": op_verify, "activate": op_activate, "rollback": op_rollback,
        "install": op_install, "configure": op_configure}


def main():
    stdin = sys.stdin.buffer
    try:
        req = json.loads(stdin.readline().decode())
        op = req["op"]
        result = op_receive(req, stdin) if op == "receive" else _OPS[op](req)
        reply = dict(result, ok=True)
    except RemoteError as e:
        reply = {"ok": False, "error": str(e)}
    except (OSError, tarfile.TarError, EOFError) as e:
        reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write("\n" + json.dumps(reply) + "\n")
    sys.stdout.flush()
    sys.exit(0 if reply["ok"] else 1)


if __name__ == "__main__":
    main()
