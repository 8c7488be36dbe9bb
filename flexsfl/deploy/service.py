"""The systemd unit that runs the edge runtime on a device, and the command to follow its log."""

from __future__ import annotations

from flexsfl.deploy import flash_remote

__all__ = ["UNIT_NAME", "render_unit", "follow_logs"]

UNIT_NAME = flash_remote.UNIT_NAME


def render_unit(directory: str, *, user: str, system: bool) -> str:
    """The systemd unit running ``DIR/venv/bin/flexsfl edge run --config DIR/config.json``.

    ``directory`` is DIR, absolute. A ``system`` unit (root flashed) runs as ``user`` and gets the
    sandboxing options that need a privileged service manager; a user unit gets those that work
    unprivileged. None of them hides DIR, the data file (read-only) or /dev (a Jetson's GPU).
    """
    after = "After=network-online.target\nWants=network-online.target\n" if system else ""
    service = f"User={user}\n" if system else ""
    hardening = (
        "NoNewPrivileges=yes\nLockPersonality=yes\nRestrictRealtime=yes\nRestrictSUIDSGID=yes\n"
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6\n"
    )
    if system:
        hardening += (
            f"PrivateTmp=yes\nProtectSystem=strict\nProtectHome=read-only\nReadWritePaths={directory}\n"
            "ProtectKernelTunables=yes\nProtectKernelModules=yes\nProtectControlGroups=yes\n"
        )
    return (
        "[Unit]\n"
        "Description=flexsfl edge runtime (FlexP-SFL client)\n"
        f"{after}"
        "\n[Service]\n"
        "Type=simple\n"
        f"{service}"
        f"WorkingDirectory={directory}\n"
        f"ExecStart={directory}/venv/bin/flexsfl edge run --config {directory}/{flash_remote.CONFIG}\n"
        "Restart=on-failure\n"
        "RestartSec=10\n"
        "Environment=PYTHONUNBUFFERED=1\n"  # log lines reach the journal as they are written
        f"Environment=XDG_CACHE_HOME={directory}/.cache\n"  # the one writable place besides DIR
        f"{hardening}"
        "\n[Install]\n"
        f"WantedBy={'multi-user.target' if system else 'default.target'}\n"
    )


# -- the runtime wheel -------------------------------------------------------------------------


def follow_logs(root: bool) -> str:
    """The command that follows the service's log (``root``: a system unit, else a user unit)."""
    return f"journalctl{'' if root else ' --user'} -u {UNIT_NAME.removesuffix('.service')} -f"
