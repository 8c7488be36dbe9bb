"""The ``flexsfl`` command: the top layer. Nothing imports it."""

from flexsfl.cli.main import build_parser, main

__all__ = ["build_parser", "main"]
