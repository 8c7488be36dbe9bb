#!/usr/bin/env python3
"""The emulated Raspberry Pi 4 (arm64 Debian under qemu-user) from the command line.

    tools/emulated_device.py check    # why emulation cannot run here, or "ok"
    tools/emulated_device.py build    # build (or reuse) the cached root; prints its stamp
    tools/emulated_device.py shell    # start it, print the ssh command, wait for Ctrl-C, stop it
    tools/emulated_device.py stop     # kill whatever runs in the root and unmount everything under it
    tools/emulated_device.py rebuild  # delete the cached root and build it again

The harness itself is tests/device/harness.py (``make test-arm64`` uses it).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from tests.device import harness  # noqa: E402

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=("check", "build", "shell", "stop", "rebuild"))
    parser.add_argument("--root", type=pathlib.Path, default=None, help="root folder (default: the cache's)")
    args = parser.parse_args(argv)
    root = args.root or harness.default_root()
    if args.command == "stop":
        done = harness.stop_all(root)
        print(f"unmounted {len(done)} mount(s) under {root}" if done else f"nothing mounted under {root}")
        return 0
    reason = harness.unavailable_reason()
    if reason:
        print(f"error: {reason}", file=sys.stderr)
        return 1
    if args.command == "check":
        print("ok")
        return 0
    if args.command == "rebuild" and root.exists():
        harness.stop_all(root)
        shutil.rmtree(root)
    t0 = time.monotonic()
    harness.ensure_root(root, log=lambda s: print(s, flush=True))
    if args.command in ("build", "rebuild"):
        stamp = harness.read_stamp(root)
        print(json.dumps({k: stamp[k] for k in ("suite", "python", "built", "build_s")}, sort_keys=True))
        print(f"root ready in {time.monotonic() - t0:.0f} s: {root}")
        return 0
    with harness.Device.start(root) as dev:
        opts = " ".join(f"-o {o}" for o in dev.ssh_options)
        print(f"ssh -p {dev.port} -i {dev.key} {opts} root@127.0.0.1\n(Ctrl-C stops the device)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
