"""``flexsfl flash``: put a bundle on an edge device over SSH and run the edge runtime there (see
:mod:`flexsfl.deploy.flash`). Steps and upload bars go to stderr, the summary to stdout."""

from __future__ import annotations

import argparse
import logging

from flexsfl.core.errors import ConfigError
from flexsfl.deploy.flash import EXTRAS, ClientSettings, flash, rollback
from flexsfl.deploy.service import UNIT_NAME
from flexsfl.deploy.ssh import DEFAULT_DIR, Remote
from flexsfl.deploy.upload import Progress

__all__ = ["add_parser", "run"]

log = logging.getLogger("flexsfl.flash")
device_log = logging.getLogger("flexsfl.flash.device")


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``flexsfl flash`` to a CLI's subparsers; the handler is :func:`run` (also ``func`` default)."""
    p = subparsers.add_parser(
        "flash",
        help="put a bundle on an edge device over SSH and run the edge runtime there as a service",
        description=(
            "Copy a bundle to an edge device over SSH (only what changed), verify every sha256 there, "
            "switch DIR/current atomically, install the edge runtime in DIR/venv and run it as the "
            f"systemd service {UNIT_NAME}. Uses your ssh client and its config; keys only (BatchMode)."
        ),
    )
    p.add_argument("bundle", nargs="?", metavar="BUNDLE", help="bundle directory or .tar.gz from `flexsfl export`")
    p.add_argument("destination", nargs="?", metavar="user@host[:DIR]",
                   help=f"SSH login and device directory (default DIR: ~/{DEFAULT_DIR})")
    p.add_argument("--port", "-p", type=int, help="SSH port (default: ssh's)")
    p.add_argument("--identity", "-i", metavar="KEY", help="SSH private key file")
    p.add_argument("-o", dest="ssh_options", action="append", default=[], metavar="KEY=VALUE",
                   help="extra ssh option, repeatable (e.g. -o StrictHostKeyChecking=accept-new)")
    c = p.add_argument_group("client config (DIR/config.json; omitted settings keep the device's)")
    c.add_argument("--server", metavar="URL", help="ws:// or wss:// URL of `flexsfl serve`")
    c.add_argument("--client-id", metavar="ID", help="this device's client id on the server")
    c.add_argument("--token-file", metavar="F",
                   help="local file with the client's token (copied to DIR/token, mode 0600)")
    c.add_argument("--data", metavar="PATH", help="the data set's path on the device (relative: under DIR)")
    c.add_argument("--backend", choices=sorted(EXTRAS), help="runtime backend (default: the target's preferred one)")
    c.add_argument("--threads", type=int, metavar="N", help="runtime threads (default: the runtime decides)")
    p.add_argument("--python", default="python3", metavar="PATH", help="python on the device (default: python3)")
    p.add_argument("--wheel", metavar="FILE", help="flexsfl wheel to install (default: built from this checkout)")
    p.add_argument("--skip-install", action="store_true", help="leave the runtime in DIR/venv as it is")
    p.add_argument("--no-service", action="store_true",
                   help="write the config but no systemd unit; print the run command")
    p.add_argument("--dry-run", action="store_true", help="probe, check and plan; change nothing on the device")
    p.add_argument("--rollback", action="store_true",
                   help="switch DIR/current back to the previous bundle (give only user@host[:DIR])")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Handle ``flexsfl flash``: steps and upload bars on stderr, the summary on stdout.

    Errors propagate as :class:`FlexSFLError` (the ``flexsfl`` main prints them as one line).
    """
    # rich's progress and logging modules cost every `flexsfl` start ~0.1 s: loaded when flashing.
    from rich.console import Console
    from rich.logging import RichHandler
    from rich.progress import BarColumn, DownloadColumn, TextColumn, TimeRemainingColumn, TransferSpeedColumn
    from rich.progress import Progress as Bars

    if args.rollback:
        if args.destination is not None or args.bundle is None:
            raise ConfigError("flexsfl flash --rollback takes one argument: user@host[:DIR]")
    elif args.bundle is None or args.destination is None:
        raise ConfigError("flexsfl flash needs BUNDLE and user@host[:DIR] (or --rollback user@host[:DIR])")
    remote = Remote.parse(args.bundle if args.rollback else args.destination, port=args.port,
                          identity=args.identity, ssh_options=tuple(args.ssh_options))
    console = Console(stderr=True)
    # A person waits on these steps (pip on a Pi takes minutes), so they show without -v; the
    # device's own output (pip's lines) shows with -v.
    handler = RichHandler(console=console, show_time=False, show_path=False, markup=False)
    saved = log.level, log.propagate, device_log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    device_log.setLevel(logging.INFO if getattr(args, "verbose", 0) else logging.WARNING)
    try:
        if args.rollback:
            report = rollback(remote, python=args.python)
        else:
            settings = ClientSettings(server=args.server, client_id=args.client_id, token_file=args.token_file,
                                      data=args.data, backend=args.backend, threads=args.threads)
            with Bars(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                      TimeRemainingColumn(), console=console) as bars:
                tasks: dict[str, int] = {}

                def show(p: Progress) -> None:
                    if p.label not in tasks:
                        tasks[p.label] = bars.add_task(p.label, total=p.total)
                    bars.update(tasks[p.label], completed=p.done, description=f"{p.label} {p.path}")

                report = flash(args.bundle, remote, settings=settings, python=args.python, wheel=args.wheel,
                               install=not args.skip_install, service=not args.no_service, dry_run=args.dry_run,
                               on_progress=show)
    finally:
        log.removeHandler(handler)
        log.setLevel(saved[0])
        log.propagate = saved[1]
        device_log.setLevel(saved[2])
    print(report.summary())
    return 0
