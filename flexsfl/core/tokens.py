"""Operator token files: one word in a file, shared by ``flexsfl serve`` and ``flexsfl status``.

The operator (admin) token guards the server's status page, ``/metrics`` and ``/api/status``
(see :mod:`flexsfl.server_backend.http`). It lives in a file, never on a command line, where
``ps`` would show it.
"""

from __future__ import annotations

import os
import pathlib

from flexsfl.core.errors import ConfigError

__all__ = ["read_admin_token", "MIN_TOKEN_CHARS"]

MIN_TOKEN_CHARS = 16  # a guessable token would make the guard decoration


def read_admin_token(path: str | os.PathLike) -> str:
    """The token in ``path``, surrounding whitespace ignored; ConfigError naming the file if it is
    unreadable, empty, shorter than :data:`MIN_TOKEN_CHARS` or more than one word."""
    p = pathlib.Path(path)
    try:
        token = p.read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        why = getattr(e, "strerror", None) or "not text"
        raise ConfigError(f"--admin-token-file {p}: cannot read it ({why}); give a readable file") from None
    if len(token) < MIN_TOKEN_CHARS or any(c.isspace() for c in token):
        raise ConfigError(f"--admin-token-file {p}: the token must be one word of at least {MIN_TOKEN_CHARS} characters; "
                          "make one with `python -c 'import secrets; print(secrets.token_urlsafe(32))'`")
    return token
