"""Turning timings into rows, and rows into JSON, CSV, PNG and a markdown table.

Every benchmark produces a list of flat rows (one per configuration) and writes them with
:func:`write_results`: ``NAME.json`` holds the rows with the full machine description in each,
``NAME.csv`` the same rows with the machine flattened into columns, so a single line of either
file says what was measured, where, with which libraries and at which commit.
"""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flexsfl.core.errors import ConfigError

__all__ = ["summarize", "write_results", "markdown_table", "line_plot", "Column", "int_list"]

# (row key, header, format spec); a missing or None value prints as "-".
Column = tuple[str, str, str]


def summarize(seconds: Sequence[float], prefix: str) -> dict[str, float]:
    """``{prefix}_ms_p50``, ``_p90``, ``_min`` and ``{prefix}_n`` of per-repetition timings in seconds."""
    ms = 1e3 * np.asarray(seconds, dtype=np.float64)
    if not ms.size:
        raise ValueError(f"no timings for {prefix}")
    return {
        f"{prefix}_ms_p50": round(float(np.percentile(ms, 50)), 3),
        f"{prefix}_ms_p90": round(float(np.percentile(ms, 90)), 3),
        f"{prefix}_ms_min": round(float(ms.min()), 3),
        f"{prefix}_n": int(ms.size),
    }


def _machine_columns(m: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "machine_cpu": m.get("cpu"),
        "machine_cores": m.get("cores"),
        "machine_memory_mb": m.get("memory_mb"),
        "machine_arch": m.get("arch"),
        "machine_board": m.get("board") or ("jetson" if m.get("jetson") else None),
        "machine_load_avg": m.get("load_avg"),
        "versions": ";".join(f"{k}={v}" for k, v in sorted(m.get("versions", {}).items())),
        "commit": m.get("commit"),
    }


def write_results(out_dir: str | os.PathLike, name: str, rows: Sequence[Mapping[str, Any]], machine: Mapping[str, Any],
                  *, meta: Mapping[str, Any] | None = None, json_path: str | os.PathLike | None = None) -> dict[str, pathlib.Path]:
    """Write ``out_dir/NAME.json`` and ``NAME.csv`` (and ``json_path`` if given); returns the paths.

    Each JSON row gets ``machine``; ``meta`` (what was run: arguments, GEMM peak) sits beside
    the rows.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    full = [{**r, "machine": dict(machine)} for r in rows]
    doc = json.dumps({"benchmark": name, "meta": dict(meta or {}), "rows": full}, indent=2, sort_keys=True, default=str) + "\n"
    paths = {"json": out / f"{name}.json", "csv": out / f"{name}.csv"}
    paths["json"].write_text(doc)
    if json_path is not None:
        paths["json_extra"] = pathlib.Path(json_path)
        paths["json_extra"].parent.mkdir(parents=True, exist_ok=True)
        paths["json_extra"].write_text(doc)
    flat = [{**{k: v for k, v in r.items() if not isinstance(v, (dict, list))}, **_machine_columns(machine)} for r in rows]
    fields: list[str] = []
    for r in flat:
        fields.extend(k for k in r if k not in fields)
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)
    return paths


def _cell(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    try:
        return format(v, fmt)
    except (TypeError, ValueError):
        return str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[Column]) -> str:
    """A GitHub markdown table of ``rows`` with the given columns."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def line_plot(path: str | os.PathLike, series: Mapping[str, tuple[Sequence[float], Sequence[float]]], *, xlabel: str,
              ylabel: str, title: str, subtitle: str = "") -> pathlib.Path:
    """One line per series (label -> (xs, ys)), markers at the points, saved as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title + (f"\n{subtitle}" if subtitle else ""), fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.set_ylim(bottom=0)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def int_list(flag: str, text: str) -> tuple[int, ...]:
    """A comma-separated integer flag (``--splits 1,3,5``); anything else is a one-line ConfigError."""
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated integers, got {text!r}") from None
