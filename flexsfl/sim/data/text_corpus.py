"""Per-device raw text for causal-LM fine-tuning, offline: one VADER domain per client, or the user's own file.

A causal LM learns from the text itself, so an example is only its ``text`` (``label`` is 0 and
ignored: the devices' labels are the input tokens, padding masked). Sources:

- :func:`vader_domains`: the VADER ground truth's four domains (tweets, movie reviews, Amazon
  reviews, NYT editorials) as four clients' corpora, each split into train and held-out test
  texts; a text never sits in one client's train set and any client's test set.
- :func:`read_text_corpus`: a ``.txt`` file (one text per non-empty line) or a ``.jsonl`` file
  whose rows hold ``"text"``, or ``"prompt"`` and ``"response"`` (instruction format);
  :func:`text_dataset`: the same file as a :class:`Dataset` for ``flexsfl simulate``.

Instruction format: :func:`instruction_text` renders a (prompt, response) pair with the
tokenizer's chat template and returns the rendered prompt too; it travels as ``Example.prompt``
to the devices, whose :meth:`TextEncoder.lm_labels` masks its tokens (loss on the response only;
the server's perplexity masks them the same way). :func:`write_client_files` writes each
client's train/test JSONL for ``flexsfl edge run --data``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from typing import Any, Sequence

import numpy as np

from flexsfl.core.errors import DataError
from flexsfl.edge_runtime.data import Example, write_jsonl
from flexsfl.sim.data.dataset import Dataset

__all__ = ["ClientText", "vader_domains", "read_text_corpus", "text_dataset", "split_corpus", "instruction_text",
           "write_client_files"]


@dataclasses.dataclass(frozen=True)
class ClientText:
    """One client's corpus: its name (the domain or file) and train / held-out texts."""

    name: str
    train: tuple[Example, ...]
    test: tuple[Example, ...]


def _key(text: str) -> str:
    return " ".join(text.lower().split())


def split_corpus(name: str, texts: Sequence[str], *, train: int, test: int, seed: int = 0,
                 exclude: set[str] | None = None) -> ClientText:
    """Shuffle ``texts`` (seeded), drop repeats and those in ``exclude``, take ``test`` then ``train`` of them.

    With fewer distinct texts than ``train + test``, a fifth of them (at least one) is held out.
    """
    if train < 1 or test < 1:
        raise DataError(f"{name}: train and test sizes must be >= 1, got {train} and {test}")
    seen = set(exclude or ())
    order = np.random.default_rng(seed).permutation(len(texts))
    picked: list[str] = []
    for i in order:
        k = _key(texts[i])
        if k and k not in seen:
            seen.add(k)
            picked.append(texts[i])
        if len(picked) == train + test:
            break
    if len(picked) < 2:
        raise DataError(f"{name}: only {len(picked)} distinct non-empty texts; a client needs at least 2")
    # Too few texts for both: a fifth (at least one) is held out.
    n_test = test if len(picked) == train + test else max(1, min(test, len(picked) // 5))
    return ClientText(name, tuple(Example(t, 0) for t in picked[n_test:]), tuple(Example(t, 0) for t in picked[:n_test]))


def vader_domains(clients: int = 4, *, train: int = 200, test: int = 50, seed: int = 0,
                  cache: str | os.PathLike | None = None) -> list[ClientText]:
    """The first ``clients`` (1..4) VADER domains, one per client, as raw text (labels dropped)."""
    from flexsfl.sim.data.sources import load_vader

    ds = load_vader(cache)
    by_domain: dict[str, list[str]] = {}
    for g, e in zip(ds.groups or (), ds.examples):
        by_domain.setdefault(g, []).append(e.text)
    domains = list(by_domain)
    if not 1 <= clients <= len(domains):
        raise DataError(f"VADER has {len(domains)} domains ({', '.join(domains)}); choose 1..{len(domains)} clients")
    out: list[ClientText] = []
    seen: set[str] = set()  # no text in two clients' corpora (VADER repeats a few across domains)
    for k, d in enumerate(domains[:clients]):
        c = split_corpus(d, by_domain[d], train=train, test=test, seed=seed + k, exclude=seen)
        seen.update(_key(e.text) for e in c.train + c.test)
        out.append(c)
    return out


def read_text_corpus(path: str | os.PathLike, *, tokenizer: Any = None) -> list[str]:
    """Texts of a ``.txt`` (one per non-empty line) or ``.jsonl`` file (``text``, or ``prompt`` + ``response``).

    Instruction rows are rendered with :func:`instruction_text`, which needs ``tokenizer``.
    Raises :class:`DataError` naming the file and line of the first bad row.
    """
    return [e.text for e, _ in _read_rows(path, tokenizer)]


def text_dataset(path: str | os.PathLike, *, tokenizer: Any = None) -> Dataset:
    """A user's text file as a causal-LM data set for ``flexsfl simulate --task causal_lm --data FILE``.

    Rows as in :func:`read_text_corpus`; an instruction row keeps its rendered prompt
    (``Example.prompt``) so the devices and the evaluation put no loss on it. A ``.jsonl`` row's
    optional ``"group"`` (a string, on every row or none) gives the groups for ``--partition natural``.
    """
    rows = _read_rows(path, tokenizer)
    groups = [g for _, g in rows]
    if any(g is None for g in groups) and not all(g is None for g in groups):
        line = next(i for i, g in enumerate(groups, 1) if g is None)
        raise DataError(f'{path}: text {line} has no "group" but others do; give every row a group or none at all')
    return Dataset(name=pathlib.Path(path).stem, examples=tuple(e for e, _ in rows),
                   groups=None if groups[0] is None else tuple(groups), label_names=("text",), source=str(path))


def _read_rows(path: str | os.PathLike, tokenizer: Any) -> list[tuple[Example, str | None]]:
    p = pathlib.Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot read the text file ({e}); pass a UTF-8 .txt or .jsonl file") from None
    rows: list[tuple[Example, str | None]] = []
    if p.suffix.lower() != ".jsonl":
        rows = [(Example(line.strip(), 0), None) for line in lines if line.strip()]
    else:
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{path}:{n}: not JSON ({e}); each line must be one JSON object") from None
            group = row.get("group") if isinstance(row, dict) else None
            if group is not None and not (isinstance(group, str) and group.strip()):
                raise DataError(f'{path}:{n}: "group" must be a non-empty string')
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                if not row["text"].strip():
                    raise DataError(f"{path}:{n}: the text is empty; remove the row or fill in its text")
                rows.append((Example(row["text"], 0), group))
            elif isinstance(row, dict) and isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
                if tokenizer is None:
                    raise DataError(f"{path}:{n}: an instruction row needs the model's tokenizer (chat template)")
                if not row["response"].strip():
                    raise DataError(f"{path}:{n}: the response is empty; an instruction row needs something to learn")
                whole, head = instruction_text(tokenizer, row["prompt"], row["response"])
                rows.append((Example(whole, 0, head), group))
            else:
                raise DataError(f'{path}:{n}: a row needs "text", or "prompt" and "response" (strings)')
    if not rows:
        raise DataError(f"{path}: holds no text; write one text per line (.txt) or JSON rows with \"text\" (.jsonl)")
    return rows


def instruction_text(tokenizer: Any, prompt: str, response: str) -> tuple[str, str]:
    """``(whole, prompt_part)``: the pair in the tokenizer's chat template, and its prefix up to the response.

    Without a chat template: ``"{prompt}\\n{response}"``. ``whole`` starts with ``prompt_part``.
    """
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": prompt}]
        head = tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(user + [{"role": "assistant", "content": response}], tokenize=False)
        if not whole.startswith(head):  # a template that rewrites earlier turns: fall back to plain text
            head, whole = prompt + "\n", prompt + "\n" + response
    else:
        head, whole = prompt + "\n", prompt + "\n" + response
    return whole, head


def write_client_files(clients: Sequence[ClientText], out: str | os.PathLike) -> dict[str, tuple[pathlib.Path, pathlib.Path]]:
    """Each client's ``{name}.train.jsonl`` and ``{name}.test.jsonl`` in ``out``; returns name -> (train, test)."""
    root = pathlib.Path(out)
    paths = {}
    for c in clients:
        tr, te = root / f"{c.name}.train.jsonl", root / f"{c.name}.test.jsonl"
        write_jsonl(tr, c.train)
        write_jsonl(te, c.test)
        paths[c.name] = (tr, te)
    return paths
