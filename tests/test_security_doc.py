"""docs/security.md names real flags, and every limit flag of `flexsfl serve` is in it."""

import argparse
import pathlib
import re

from flexsfl.cli import clients, edge, flash, serve

DOC = pathlib.Path(__file__).resolve().parents[1] / "docs" / "security.md"
LIMITS = {"--max-connections", "--max-unauthenticated", "--step-timeout", "--upload-norm-factor", "--aggregation",
          "--round-timeout", "--local-steps", "--max-batch", "--max-seq"}


def _flags(*adders) -> set[str]:
    """Every option string of the commands these add_parser functions build (sub-commands included)."""
    root = argparse.ArgumentParser()
    sub = root.add_subparsers()
    for add in adders:
        add(sub)
    out, todo = set(), [root]
    while todo:
        p = todo.pop()
        for act in p._actions:
            out.update(act.option_strings)
            if isinstance(act, argparse._SubParsersAction):
                todo.extend(act.choices.values())
    return out


def test_security_doc_and_flags_agree():
    named = set(re.findall(r"`(--[a-z-]+)", DOC.read_text()))
    assert LIMITS <= _flags(serve.add_parser) and LIMITS <= named
    unknown = named - _flags(serve.add_parser, edge.add_parser, flash.add_parser, clients.add_parser)
    assert not unknown, f"docs/security.md names flags that do not exist: {sorted(unknown)}"
