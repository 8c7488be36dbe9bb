"""Accuracy-aware split choice: trade a layout's predicted device time against the accuracy it reaches.

The planners (:mod:`flexsfl.core.planner`, :mod:`flexsfl.core.u_planner`) choose the fastest
layout that fits a device's memory. Faster is not always better: a deeper split gives the client
more personal blocks, a U-shaped top a personal output layer, and either can reach a higher
accuracy on the client's data (the paper's revision argues that memory-only choices lose). How
much higher is measured, not modelled: a **calibration** holds the accuracy that short runs
reached per layout ``(split, top)`` (``top`` None: head/tail), and a user weight ``W`` says how
much accuracy is worth in step time::

    utility(c) = W · accuracy(c) − time_s(c) / time_s(fastest fitting layout)

``W = 0`` keeps the planner's choice unchanged. Otherwise the fitting layout with a calibrated
accuracy and the largest utility wins; utilities that agree to
:data:`~flexsfl.core.planner.TIE_RTOL` go to fewer device blocks, then to the faster. Read ``W``
as: one accuracy point (0.01) is worth ``W`` % of the fastest step time; e.g. ``W = 10`` accepts
a layout 10 % slower per step for each point of accuracy it adds. Layouts without a calibration
point are not guessed at (accuracy need not be monotone in the split); they stay in the table
and cannot be chosen when ``W > 0``.

A calibration comes from the ``summary.json`` of earlier ``flexsfl simulate`` runs of FlexP-SFL
(:func:`calibration_from_runs`: the mean of a per-client metric over the clients at each
layout, over every run), or from a calibration file that :meth:`Calibration.to_json` wrote
(:func:`read_calibration` takes either). Runs compare best when they differ only in the layout:
``flexsfl simulate --splits S [--topology u --tops U]`` with the same data, seed, rounds and
steps, one run per layout.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
from typing import Any, Iterable, Sequence

from flexsfl.core.errors import ConfigError
from flexsfl.core.planner import TIE_RTOL

__all__ = ["CALIBRATION_SCHEMA", "METRICS", "CalibrationPoint", "Calibration", "calibration_from_runs",
           "read_calibration", "TradeRow", "TradeOff", "trade_off"]

CALIBRATION_SCHEMA = 1  # version of the calibration file's format
METRICS = ("personal_acc", "generalization_acc")  # per-client accuracies a simulate summary records
SPLIT_STRATEGIES = ("flexpsfl", "flexpsfl-u")  # the runs whose layout the planner chooses

Layout = tuple[int, "int | None"]  # (split, top); top None: head/tail


@dataclasses.dataclass(frozen=True)
class CalibrationPoint:
    """The accuracy one layout reached: the mean of ``clients`` per-client values from ``runs`` runs."""

    split: int
    top: int | None  # None: head/tail
    accuracy: float
    clients: int = 1
    runs: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.split, int) or isinstance(self.split, bool) or self.split < 1:
            raise ConfigError(f"calibration point: split must be an int >= 1, got {self.split!r}")
        if self.top is not None and (not isinstance(self.top, int) or isinstance(self.top, bool) or self.top < 0):
            raise ConfigError(f"calibration point: top must be null (head/tail) or an int >= 0, got {self.top!r}")
        if not isinstance(self.accuracy, (int, float)) or isinstance(self.accuracy, bool) or not 0 <= self.accuracy <= 1:
            raise ConfigError(f"calibration point ({self.split}, {self.top}): accuracy must be a number in 0..1, "
                              f"got {self.accuracy!r}")

    @property
    def layout(self) -> Layout:
        return (self.split, self.top)


@dataclasses.dataclass(frozen=True)
class Calibration:
    """Accuracy per layout, with what it was measured on (``model``, ``task``, ``metric``)."""

    points: tuple[CalibrationPoint, ...]
    metric: str = "personal_acc"
    model: str | None = None
    task: str | None = None
    sources: tuple[str, ...] = ()  # the runs it came from

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ConfigError(f"calibration metric must be one of {', '.join(METRICS)}, got {self.metric!r}")
        if not self.points:
            raise ConfigError("a calibration needs at least one (split, top, accuracy) point")
        layouts = [p.layout for p in self.points]
        if len(set(layouts)) != len(layouts):
            raise ConfigError("calibration lists a (split, top) layout twice; give one accuracy per layout")

    def accuracy(self, split: int, top: int | None) -> float | None:
        """The calibrated accuracy of ``(split, top)``, or None when it was not measured."""
        return next((p.accuracy for p in self.points if p.layout == (split, top)), None)

    def to_json(self) -> dict[str, Any]:
        return {"schema": CALIBRATION_SCHEMA, "metric": self.metric, "model": self.model, "task": self.task,
                "sources": list(self.sources), "points": [dataclasses.asdict(p) for p in self.points]}

    @classmethod
    def from_json(cls, data: Any, where: str) -> "Calibration":
        """Parse :meth:`to_json`'s output; ``where`` names the file in errors."""
        if not isinstance(data, dict) or data.get("schema") != CALIBRATION_SCHEMA or not isinstance(data.get("points"), list):
            raise ConfigError(f"{where}: not a calibration file (want an object with schema {CALIBRATION_SCHEMA} and a "
                              "'points' list), nor a simulate summary.json; write one with `flexsfl plan --calibrate-from "
                              "RUNS_DIR --save-calibration FILE`")
        points = []
        for i, p in enumerate(data["points"]):
            if not isinstance(p, dict) or not {"split", "accuracy"} <= set(p):
                raise ConfigError(f"{where}: points[{i}] needs 'split', 'top' (null for head/tail) and 'accuracy'")
            try:
                points.append(CalibrationPoint(p["split"], p.get("top"), p["accuracy"], p.get("clients", 1), p.get("runs", 1)))
            except ConfigError as e:
                raise ConfigError(f"{where}: points[{i}]: {e}") from None
        try:
            return cls(tuple(points), data.get("metric", "personal_acc"), data.get("model"), data.get("task"),
                       tuple(data.get("sources", ())))
        except ConfigError as e:
            raise ConfigError(f"{where}: {e}") from None


def _load_json(path: pathlib.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read it ({e.__class__.__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg}); give a calibration file or a "
                          "directory of `flexsfl simulate` results") from None


def _run_points(summary: Any, path: pathlib.Path, metric: str) -> tuple[dict, dict[Layout, list[float]]]:
    """(config, per-layout metric values of one run's clients) from a simulate ``summary.json``."""
    cfg = summary.get("config") if isinstance(summary, dict) else None
    clients = summary.get("per_client") if isinstance(summary, dict) else None
    if not isinstance(cfg, dict) or not isinstance(clients, list):
        raise ConfigError(f"{path}: not a `flexsfl simulate` summary (no 'config' and 'per_client'); remove it from the "
                          "calibration directory")
    if cfg.get("strategy") not in SPLIT_STRATEGIES:
        raise ConfigError(f"{path}: a {cfg.get('strategy')!r} run; calibrate with FlexP-SFL runs "
                          f"({', '.join(SPLIT_STRATEGIES)}), whose layout the planner chooses")
    u = cfg.get("topology") == "u"
    out: dict[Layout, list[float]] = {}
    for c in clients:
        value = c.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{path}: client {c.get('client')!r} has no {metric} (a causal LM run, or evaluation "
                              f"off); calibrate with classification runs or choose --calibration-metric from "
                              f"{', '.join(METRICS)}")
        top = (c.get("choice") or {}).get("top") if u else None
        if u and not isinstance(top, int):
            raise ConfigError(f"{path}: U-shaped client {c.get('client')!r} records no top; re-run it with this flexsfl")
        out.setdefault((int(c["split"]), top), []).append(float(value))
    return cfg, out


def calibration_from_runs(summaries: Sequence[pathlib.Path], metric: str = "personal_acc") -> Calibration:
    """A calibration from simulate ``summary.json`` files: per layout, the mean of ``metric`` over
    every client at that layout in every run. All runs must be of one model and task."""
    if metric not in METRICS:
        raise ConfigError(f"calibration metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if not summaries:
        raise ConfigError("no summary.json to calibrate from; run `flexsfl simulate --splits S ...` once per layout first")
    values: dict[Layout, list[float]] = {}
    runs: dict[Layout, int] = {}
    seen: dict[str, tuple[str, pathlib.Path]] = {}
    for path in summaries:
        cfg, points = _run_points(_load_json(path), path, metric)
        for key in ("model", "task"):
            first = seen.setdefault(key, (cfg.get(key), path))
            if first[0] != cfg.get(key):
                raise ConfigError(f"{path}: a run of {key} {cfg.get(key)!r}, but {first[1]} is of {first[0]!r}; "
                                  f"calibrate with runs of one {key}")
        for layout, vals in points.items():
            values.setdefault(layout, []).extend(vals)
            runs[layout] = runs.get(layout, 0) + 1
    points = tuple(CalibrationPoint(s, t, round(sum(v) / len(v), 6), len(v), runs[(s, t)])
                   for (s, t), v in sorted(values.items(), key=lambda kv: (kv[0][1] is not None, kv[0][0], kv[0][1] or 0)))
    return Calibration(points, metric, seen["model"][0], seen["task"][0], tuple(str(p) for p in summaries))


def read_calibration(path: str | pathlib.Path, metric: str = "personal_acc") -> Calibration:
    """A calibration from ``path``: a directory (every ``summary.json`` below it, see
    :func:`calibration_from_runs`), one simulate ``summary.json``, or a calibration file."""
    path = pathlib.Path(path)
    if path.is_dir():
        found = sorted(path.rglob("summary.json"))
        if not found:
            raise ConfigError(f"{path}: no summary.json below it; point --calibrate-from at the --out directories of "
                              "`flexsfl simulate` runs, or at a calibration file")
        return calibration_from_runs(found, metric)
    if not path.exists():
        raise ConfigError(f"{path}: no such calibration file or directory")
    data = _load_json(path)
    if isinstance(data, dict) and "per_client" in data:
        return calibration_from_runs([path], metric)
    return Calibration.from_json(data, str(path))


@dataclasses.dataclass(frozen=True)
class TradeRow:
    """One candidate layout in the trade-off: its prediction, calibrated accuracy and utility."""

    split: int
    top: int | None
    time_s: float
    memory_mb: float
    fits: bool
    accuracy: float | None  # None: not calibrated
    utility: float | None  # None: not calibrated, or does not fit

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True)
class TradeOff:
    """The accuracy-aware choice among a planner's candidates."""

    split: int
    top: int | None
    weight: float
    rows: tuple[TradeRow, ...]
    reason: str
    planner: Layout  # the planner's own choice (the fastest that fits, or the pinned layout)

    @property
    def changed(self) -> bool:
        """Whether the accuracy moved the choice away from the planner's."""
        return (self.split, self.top) != tuple(self.planner)

    def to_json(self) -> dict[str, Any]:
        return {"split": self.split, "top": self.top, "accuracy_weight": self.weight, "changed": self.changed,
                "planner": list(self.planner), "reason": self.reason, "rows": [r.to_json() for r in self.rows]}


def trade_off(estimates: Iterable[Any], chosen: Layout, calibration: Calibration, weight: float, *,
              allowed: Iterable[Layout] | None = None) -> TradeOff:
    """Choose among a planner's ``estimates`` (:class:`~flexsfl.core.planner.SplitEstimate` or
    :class:`~flexsfl.core.u_planner.UEstimate`: ``split``, ``top`` for U, ``time_s``, ``memory_mb``,
    ``fits``) by utility (module docstring). ``chosen`` is the planner's own choice, kept when
    ``weight == 0``; ``allowed`` limits the choice (the user's pins). Raises :class:`ConfigError`
    when ``weight > 0`` and no allowed fitting layout is calibrated."""
    if not isinstance(weight, (int, float)) or not math.isfinite(weight) or weight < 0:
        raise ConfigError(f"--accuracy-weight must be a number >= 0, got {weight!r}")
    estimates = list(estimates)
    allowed = set(allowed) if allowed is not None else None
    fitting = [e for e in estimates if e.fits]
    fastest = min((e.time_s for e in fitting), default=None)
    rows = []
    for e in estimates:
        acc = calibration.accuracy(e.split, getattr(e, "top", None))
        utility = weight * acc - e.time_s / fastest if acc is not None and e.fits and fastest else None
        rows.append(TradeRow(e.split, getattr(e, "top", None), e.time_s, e.memory_mb, e.fits, acc, utility))
    if weight == 0:
        return TradeOff(*chosen, weight, tuple(rows), "accuracy weight 0: the planner's choice", tuple(chosen))
    eligible = [r for r in rows if r.utility is not None and (allowed is None or (r.split, r.top) in allowed)]
    if not eligible:
        have = ", ".join(_name((p.split, p.top)) for p in calibration.points)
        raise ConfigError(f"no fitting layout here has a calibrated accuracy (the calibration has {have}); calibrate "
                          "the layouts this device can run, or use --accuracy-weight 0")
    best = eligible[0]
    for r in eligible[1:]:
        better = r.utility > best.utility + TIE_RTOL * abs(best.utility)
        tie = abs(r.utility - best.utility) <= TIE_RTOL * abs(best.utility)
        if better or (tie and (_blocks(r), r.time_s) < (_blocks(best), best.time_s)):
            best = r
    planner = next((r for r in rows if (r.split, r.top) == tuple(chosen)), None)
    reason = (f"largest utility {weight:g} x accuracy - step time / fastest ({best.utility:.4g}): {_name((best.split, best.top))} "
              f"reaches {best.accuracy:.3f} at {best.time_s:.3g} s/step")
    if planner is not None and (best.split, best.top) != tuple(chosen):
        reason += (f"; the planner's choice, {_name(tuple(chosen))}, " + (f"reaches {planner.accuracy:.3f} at {planner.time_s:.3g} s/step"
                   if planner.accuracy is not None else f"takes {planner.time_s:.3g} s/step but is not calibrated"))
    return TradeOff(best.split, best.top, weight, tuple(rows), reason, tuple(chosen))


def _blocks(r: TradeRow) -> int:
    return r.split + (r.top or 0)


def _name(layout: Layout) -> str:
    s, t = layout
    return f"split {s}" if t is None else f"({s}, {t})"
