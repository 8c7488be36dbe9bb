"""flexsfl.deploy.service: the systemd units (system and user) run the edge runtime, restart it, sandbox it."""

from __future__ import annotations

from flexsfl.deploy.service import follow_logs, render_unit


def test_units_run_the_edge_runtime_with_restart_and_sandboxing():
    system = render_unit("/opt/flexsfl", user="pi", system=True)
    user = render_unit("/home/pi/flexsfl", user="pi", system=False)
    for unit, d in ((system, "/opt/flexsfl"), (user, "/home/pi/flexsfl")):
        assert f"ExecStart={d}/venv/bin/flexsfl edge run --config {d}/config.json\n" in unit
        assert f"WorkingDirectory={d}\n" in unit
        assert "Restart=on-failure\n" in unit and "RestartSec=10\n" in unit
        assert "NoNewPrivileges=yes\n" in unit
    assert "User=pi\n" in system and "WantedBy=multi-user.target\n" in system
    assert "ProtectSystem=strict\n" in system and "ReadWritePaths=/opt/flexsfl\n" in system
    assert "After=network-online.target" in system
    # A user manager runs its units as that user and cannot apply the privileged sandboxing.
    assert "User=" not in user and "ProtectSystem" not in user and "WantedBy=default.target\n" in user



def test_follow_logs_names_the_unit_for_its_manager():
    assert follow_logs(True) == "journalctl -u flexsfl-edge -f"
    assert follow_logs(False) == "journalctl --user -u flexsfl-edge -f"
