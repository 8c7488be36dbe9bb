"""A suite's report: intervals per run, paired differences against the reference, the table, the plot.

Input: the rows of :func:`flexsfl.benchmarks.accuracy.row`, one per (run, seed), each with ``out``
(its results directory). The reference (FlexP-SFL, λ = 0.1) is compared with every other run seed
by seed (:func:`~flexsfl.benchmarks.stats.paired_difference`); a difference is called a win or a
loss only when its 95% interval excludes 0, a tie otherwise. The floor — the same run's global
model with each client's label prior, no training — is paired with the reference's personal
accuracy too: personalization that does not beat it has added nothing a client's ten class
frequencies would not.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Sequence

import numpy as np

from flexsfl.benchmarks.stats import Interval, paired_difference, t_interval

__all__ = ["METRICS", "PAIRED", "CLIENT_SIDE", "incomplete", "summarize", "markdown", "plot_suite"]

# metric -> column title; every one gets a mean ± 95% CI over seeds
# (the global model on each client's own split equals "global acc" when, as in every suite, the clients'
# test splits are the same size: it is left out)
METRICS = {"personal_acc": "personal acc", "generalization_acc": "generalization acc", "global_acc": "global acc",
           "label_prior_acc": "floor: global + prior", "device_s": "device time (s)", "mb": "train MB",
           "eval_mb": "eval MB", "train_s": "wall here (s)"}
PAIRED = ("personal_acc", "generalization_acc")  # compared seed by seed against the reference
FLOOR = "floor (same run)"  # the reference's personal accuracy against its own run's global + label prior


# the metrics the clients report (personal accuracy, and the device clock and bytes built from their reports):
# a run in which some client's report was lost (a reconnect under load) has them for part of the clients only
CLIENT_SIDE = ("personal_acc", "device_s", "mb", "eval_mb")


def incomplete(r: dict) -> bool:
    """Whether some client's last-round metrics never reached the server in run ``r``."""
    return r.get("clients_reported", r.get("clients", 0)) < r.get("clients", 0)


def _by_seed(rows: Sequence[dict], run: str, key: str) -> dict[int, float | None]:
    """``seed -> value``; a client-side metric of an incomplete run is None (left out, never averaged over part)."""
    return {r["seed"]: None if key in CLIENT_SIDE and incomplete(r) else r.get(key) for r in rows if r["run"] == run}


def _iv(iv: Interval, per_seed: dict | None = None) -> dict:
    return {"mean": iv.mean, "half": iv.half, "n": iv.n, **({"per_seed": per_seed} if per_seed is not None else {})}


def summarize(rows: Sequence[dict], reference: str) -> dict:
    """``{"reference", "intervals": {run: {metric: {mean, half, n}}}, "paired": {run: {metric: {mean,
    half, n, per_seed}}}}``; paired holds every other run and :data:`FLOOR`, when the reference ran."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    intervals = {}
    for run in runs:
        intervals[run] = {}
        for key in METRICS:
            vals = [v for v in _by_seed(rows, run, key).values() if v is not None]
            if vals:
                intervals[run][key] = _iv(t_interval(vals))
    paired: dict[str, dict] = {}
    if reference in runs:
        for run in runs:
            if run == reference:
                continue
            for key in PAIRED:
                got = paired_difference(_by_seed(rows, reference, key), _by_seed(rows, run, key))
                if got:
                    paired.setdefault(run, {})[key] = _iv(*got)
        got = paired_difference(_by_seed(rows, reference, "personal_acc"), _by_seed(rows, reference, "label_prior_acc"))
        if got:
            paired[FLOOR] = {"personal_acc": _iv(*got)}
    return {"reference": reference, "intervals": intervals, "paired": paired}


def _cell(d: dict | None, digits: int = 3, signed: bool = False) -> str:
    return "—" if d is None else Interval(d["mean"], d["half"], d["n"]).format(digits, signed)


def _verdict(d: dict | None) -> str:
    if d is None or d["half"] is None:
        return "—"
    return "tie" if abs(d["mean"]) <= d["half"] else ("wins" if d["mean"] > 0 else "loses")


def markdown(suite, rows: Sequence[dict], report: dict, left_out: Sequence[str] = ()) -> str:
    """The suite's two tables (runs with 95% intervals; paired differences) and a line of settings."""
    cfg = suite.config
    seeds = sorted({r["seed"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))
    splits = {r["run"]: r["splits"] for r in rows}
    one = rows[0] if rows else {}
    out = [f"**{suite.name}**: {suite.what}. Seeds {', '.join(map(str, seeds))}; {cfg.clients} clients "
           f"({', '.join(cfg.profiles or ())}), {one.get('rounds', cfg.rounds)} rounds × τ = {cfg.local_steps}, "
           f"B = {cfg.batch_size}, T ≤ {cfg.max_seq}, {cfg.optimizer} lr {cfg.lr:g}, ≤ {cfg.max_train} train / "
           f"{cfg.max_test} test examples per client. Mean ± 95% t-interval over seeds "
           f"(no ± with one seed).", ""]
    digits = {"device_s": 0, "mb": 1, "eval_mb": 1, "train_s": 0}
    out.append("| run | splits | " + " | ".join(METRICS.values()) + " |")
    out.append("|---" * (len(METRICS) + 2) + "|")
    for run in runs:
        iv = report["intervals"].get(run, {})
        out.append(f"| {run} | {splits[run]} | "
                   + " | ".join(_cell(iv.get(k), digits.get(k, 3)) for k in METRICS) + " |")
    ref = report["reference"]
    if report["paired"]:
        out += ["", f"Paired differences, {ref} − run, seed by seed (same partition): mean ± 95% CI; "
                    f"wins/loses only when the interval excludes 0.", "",
                "| run | Δ personal | per seed | verdict | Δ generalization | per seed | verdict |",
                "|---|---|---|---|---|---|---|"]
        for run, d in report["paired"].items():
            cells = []
            for key in PAIRED:
                x = d.get(key)
                per = "—" if x is None else ", ".join(f"{v:+.3f}" for _, v in sorted(x["per_seed"].items()))
                cells += [_cell(x, 3, True), per, _verdict(x)]
            out.append(f"| {run} | " + " | ".join(cells) + " |")
    if left_out:
        out += ["", f"Not run (no such strategy on the server yet): {', '.join(left_out)}."]
    lost = [f"{r['run']} seed {r['seed']} ({r['clients_reported']} of {r['clients']})" for r in rows if incomplete(r)]
    if lost:
        out += ["", "Client metrics lost (a client's report dropped with its connection), so its personal accuracy, "
                    f"device time and bytes are left out of the means and pairs: {'; '.join(lost)}."]
    unfit = sorted({u for r in rows for u in r.get("unfit", [])})
    if unfit:
        out += ["", f"Would not fit its device's memory (timed anyway): {'; '.join(unfit)}."]
    return "\n".join(out) + "\n"


def _rounds(out: str) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "rounds.jsonl").read_text().splitlines() if line]


def plot_suite(suite, rows: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """Two panels: mean personal accuracy per round vs device time (the clock's; wall time here
    when the suite names no profiles), with the final round's 95% interval; and final
    generalization ± 95% CI vs device time. One colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexsfl.core.atomic import atomic_path

    runs = list(dict.fromkeys(r["run"] for r in rows))
    clock = all(r.get("device_s") is not None for r in rows)
    xkey = "device_s" if clock else "elapsed_s"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    xs_all = []
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        per_seed = [_rounds(r["out"]) for r in rows if r["run"] == run and not incomplete(r)]
        if not per_seed:
            continue
        n = min(len(rs) for rs in per_seed)
        x = [float(np.mean([rs[k][xkey] for rs in per_seed])) for k in range(n)]
        y = [float(np.mean([rs[k]["personal_acc"] for rs in per_seed if rs[k].get("personal_acc") is not None]
                           or [np.nan])) for k in range(n)]
        xs_all += x
        axes[0].plot(x, y, marker="o", ms=3, color=color, label=run)
        last = [rs[n - 1]["personal_acc"] for rs in per_seed if rs[n - 1].get("personal_acc") is not None]
        if len(last) > 1:
            axes[0].errorbar(x[-1], np.mean(last), yerr=t_interval(last).half, color=color, capsize=3)
        gen = [r["generalization_acc"] for r in rows if r["run"] == run and r.get("generalization_acc") is not None]
        if gen:
            iv = t_interval(gen)
            axes[1].errorbar(x[-1], iv.mean, yerr=iv.half or 0, fmt="o", color=color, capsize=3, label=run)
    log_x = bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20
    xlabel = "device time for the profiles (s, the clock)" if clock else "training wall time here (s)"
    for ax, title in zip(axes, ("personal accuracy (own test split), mean over seeds",
                                "generalization (personal model, union test), final, ± 95% CI")):
        ax.set_xlabel(xlabel + (", log scale" if log_x else ""))
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)  # an interval over 2 seeds (t = 12.7) may reach past [0, 1]
        ax.set_title(title, fontsize=10)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{suite.name}: {suite.what} ({len({r['seed'] for r in rows})} seeds)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
