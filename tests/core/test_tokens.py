"""The operator token file: what is accepted, and the one-line errors for what is not."""

from __future__ import annotations

import pytest

from flexsfl.core.errors import ConfigError
from flexsfl.core.tokens import read_admin_token


def test_token_is_the_file_s_one_word(tmp_path):
    (tmp_path / "t").write_text("  s3cret-0123456789abcdef\n")
    assert read_admin_token(tmp_path / "t") == "s3cret-0123456789abcdef"


@pytest.mark.parametrize("content, says", [
    (None, "cannot read it"),
    ("", "at least 16"),
    ("short\n", "at least 16"),
    ("two words-0123456789\n", "one word"),
    (b"\xff\xfe\x00bad", "cannot read it"),
])
def test_bad_token_files_are_one_clear_line(tmp_path, content, says):
    path = tmp_path / "admin.token"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as e:
        read_admin_token(path)
    msg = str(e.value)
    assert msg.startswith(f"--admin-token-file {path}:") and says in msg and "\n" not in msg
