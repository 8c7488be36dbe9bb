"""``flexsfl clients add|list`` (:mod:`flexsfl.cli.clients`): a token printed once, its file private."""

import os
import stat

from flexsfl.cli import main


def test_clients_cli_prints_a_token_and_writes_the_token_file(tmp_path, capsys):
    assert main(["clients", "add", "dev1", "--clients", str(tmp_path / "c.json"), "--token-file", str(tmp_path / "t")]) == 0
    token = capsys.readouterr().out.strip()
    assert (tmp_path / "t").read_text().strip() == token
    assert stat.S_IMODE(os.stat(tmp_path / "t").st_mode) == 0o600
    assert main(["clients", "add", "dev1", "--clients", str(tmp_path / "c.json")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["clients", "list", "--clients", str(tmp_path / "c.json")]) == 0
    assert capsys.readouterr().out.startswith("dev1\tcreated ")
