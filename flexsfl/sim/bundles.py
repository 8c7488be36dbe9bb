"""Export a run's missing bundles in parallel: one process per export, one thread each.

A simulation needs one bundle per split point (the demo: two). An export is single-threaded
for most of its time (tracing, lowering, writing), so on a machine with several cores the
bundles are exported side by side, each in its own process pinned to one thread (no
oversubscription, and no torch state shared with the caller). Bundles already in the cache
(a ``manifest.json`` in their directory) are reused, never re-exported. A single missing bundle
is exported in this process (a process start would only add the cost of importing torch).

Simulations running at once share the cache: each bundle is exported under a lock of its own
(:func:`export_cached`), so a second process waits for the first one's export and reuses it. Two
exports of one bundle used to race: the later one replaced the directory while the earlier one's
clients were reading it ("sha256 mismatch (tampered with or truncated)").
"""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import pathlib
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor

from flexsfl.core.errors import FlexSFLError

__all__ = ["export_cached", "export_missing"]


def _one_thread() -> None:
    # Runs in the worker before torch is imported there: OpenMP reads this once, at load.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["TOKENIZERS_PARALLELISM"] = "false"


def export_cached(config) -> bool:
    """Export ``config`` into ``config.out`` unless a bundle is already there; True if this call exported.

    One process at a time per bundle (an advisory lock on a hidden file beside it, released when
    the export ends or its process dies): a process that finds the lock taken waits, then finds the
    other's bundle and reuses it."""
    from flexsfl.export.pipeline import export_bundle

    out = pathlib.Path(config.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (out / "manifest.json").exists():
            return False
        export_bundle(config, progress=False)
        return True


def _export(config) -> bool:
    """Worker: export one bundle (torch imported here, after :func:`_one_thread`)."""
    import torch

    torch.set_num_threads(1)
    try:
        return export_cached(config)
    except FlexSFLError as e:  # project errors carry extra state; re-raise as one plain line across the process boundary
        raise RuntimeError(f"{type(e).__name__}: {e}") from None


def export_missing(jobs: Sequence[tuple[pathlib.Path, object]], *, workers: int | None = None,
                   on_start: Callable[[list[pathlib.Path]], None] | None = None) -> list[pathlib.Path]:
    """Export every ``(path, ExportConfig)`` whose ``path`` holds no bundle yet; returns those exported.

    ``config.out`` must be ``path``. Up to ``workers`` (default: the CPU count) exports run at
    once, each in a spawned process with one thread. ``on_start`` is told which paths will be
    exported before the work starts. An export's error is raised here, naming the bundle.
    """
    todo: dict[pathlib.Path, object] = {}
    for path, config in jobs:
        if pathlib.Path(config.out) != pathlib.Path(path):
            raise ValueError(f"export job for {path} writes to {config.out}")
        if not (pathlib.Path(path) / "manifest.json").exists():
            todo.setdefault(pathlib.Path(path), config)
    if on_start is not None and todo:
        on_start(list(todo))
    if len(todo) <= 1 or (workers or os.cpu_count() or 1) <= 1:
        return [path for path, config in todo.items() if export_cached(config)]
    n = min(len(todo), workers or os.cpu_count() or 1)
    done = []
    with ProcessPoolExecutor(n, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread) as pool:
        futures = {path: pool.submit(_export, config) for path, config in todo.items()}
        for path, fut in futures.items():
            try:
                if fut.result():
                    done.append(path)
            except Exception as e:  # noqa: BLE001 - a worker's failure, whatever it was, names its bundle
                raise FlexSFLError(f"exporting the bundle {path.name} failed: {e}") from None
    return done
