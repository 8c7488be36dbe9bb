"""A suite's report: intervals per run, paired differences against the reference, the table, the plot.

Input: the rows of :func:`flexsfl.benchmarks.accuracy.row`, one per (run, seed), each with ``out``
(its results directory). The reference (FlexP-SFL, λ = 0.1) is compared with every other run seed
by seed (:func:`~flexsfl.benchmarks.stats.paired_difference`); a difference is called a win or a
loss only when its 95% interval excludes 0, a tie otherwise. The floor — the same run's global
model with each client's label prior, no training — is paired with the reference's personal
accuracy too: personalization that does not beat it has added nothing a client's ten class
frequencies would not.

A causal LM's suite (rows with ``task`` ``causal_lm``, e.g. ``lm``) is scored by perplexity, lower is
better (:data:`LM_METRICS`, :data:`LM_PAIRED`): the same intervals and pairs, a win is a *negative*
difference (:func:`~flexsfl.benchmarks.stats.verdict`), and there is no label-prior floor ("—").
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from flexsfl.benchmarks.stats import Interval, paired_difference, t_interval, verdict
from flexsfl.sim.results import FINE_TUNE, OWN_MODEL

__all__ = ["METRICS", "PAIRED", "LM_METRICS", "LM_PAIRED", "CLIENT_SIDE", "FINE_TUNED", "NO_FINE_TUNE", "PLATEAU_ROUNDS", "PLATEAU_PART", "PLATEAU_GAIN", "is_lm",
           "incomplete", "plateau", "summarize", "markdown", "plot_suite"]

# metric -> column title; every one gets a mean ± 95% CI over seeds
# (the global model on each client's own split equals "global acc" when, as in every suite, the clients'
# test splits are the same size: it is left out)
METRICS = {"personal_acc": "personal acc", "generalization_acc": "generalization acc", "global_acc": "global acc",
           "label_prior_acc": "floor: global + prior", "device_s": "device time (s)", "mb": "train MB",
           "eval_mb": "eval MB", "train_s": "wall here (s)"}
PAIRED = ("personal_acc", "generalization_acc")  # compared seed by seed against the reference
FLOOR = "floor (same run)"  # the reference's personal accuracy against its own run's global + label prior
# Strategies whose ``personal_acc`` is *global + local fine-tune*: the same run also gives the plain global model on
# each client's own split (``global_own_acc``), the baseline without the fine-tune, paired as "<run>, global (no
# fine-tune)" (personal accuracy only: the global model's generalization is the global acc column)
FINE_TUNED = tuple(strategy for strategy, own in OWN_MODEL.items() if own == FINE_TUNE)
NO_FINE_TUNE = "{run}, global (no fine-tune)"
# a causal LM: perplexities on each client's own held-out text (personal, global, before training) and of each
# personal model on the other clients' texts, means over clients (server-side: scored on what the clients upload)
LM_METRICS = {"personal_ppl": "personal ppl", "generalization_ppl": "generalization ppl", "global_ppl": "global ppl",
              "pretrained_ppl": "pretrained ppl", "device_s": "device time (s)", "mb": "train MB", "eval_mb": "eval MB",
              "train_s": "wall here (s)"}
LM_PAIRED = ("personal_ppl", "generalization_ppl")


# the metrics the clients report (personal accuracy, and the device clock and bytes built from their reports):
# a run in which some client's report was lost (a reconnect under load) has them for part of the clients only
CLIENT_SIDE = ("personal_acc", "device_s", "mb", "eval_mb")
# Trained to a plateau: the trend of personal accuracy over the last 1/PLATEAU_PART of the run (at least
# PLATEAU_ROUNDS + 1 rounds; a least-squares line through the rounds the devices scored in them) gains under
# PLATEAU_GAIN per PLATEAU_ROUNDS rounds in every seed (a causal LM: its personal perplexity falls by less than that
# fraction of its mean over them). A trend, not the difference of two rounds: at 4 x 200 test examples a round's
# mean accuracy has a sampling error of ~0.01-0.02, as large as the bar, so two rounds' difference called noise
# "still rising" (and a rise a plateau) by chance. markdown() says "third": keep them together
PLATEAU_ROUNDS, PLATEAU_PART, PLATEAU_GAIN = 3, 3, 0.01


def is_lm(rows: Sequence[dict]) -> bool:
    """Whether the rows are a causal LM's (perplexity, lower is better)."""
    return any(r.get("task") == "causal_lm" for r in rows)


def _measures(rows: Sequence[dict]) -> tuple[dict[str, str], tuple[str, ...]]:
    return (LM_METRICS, LM_PAIRED) if is_lm(rows) else (METRICS, PAIRED)


def incomplete(r: dict) -> bool:
    """Whether some client's last-round metrics never reached the server in run ``r``."""
    return r.get("clients_reported", r.get("clients", 0)) < r.get("clients", 0)


def _by_seed(rows: Sequence[dict], run: str, key: str) -> dict[int, float | None]:
    """``seed -> value``; a client-side metric of an incomplete run is None (left out, never averaged over part)."""
    return {r["seed"]: None if key in CLIENT_SIDE and incomplete(r) else r.get(key) for r in rows if r["run"] == run}


def _iv(iv: Interval, per_seed: dict | None = None) -> dict:
    return {"mean": iv.mean, "half": iv.half, "n": iv.n, **({"per_seed": per_seed} if per_seed is not None else {})}


def plateau(rows: Sequence[dict], run: str) -> dict | None:
    """How much run ``run`` still gains at the end, ``{"gain", "per_seed", "plateau"}``: per complete seed,
    the slope of a least-squares line through its clients' mean personal accuracy at the rounds scored in
    the last 1/:data:`PLATEAU_PART` of its rounds (at least ``PLATEAU_ROUNDS + 1``), times
    :data:`PLATEAU_ROUNDS` (a causal LM: the fall of its
    personal perplexity so measured, over the window's mean perplexity); ``gain`` is the mean over seeds.
    A plateau when every seed gains under :data:`PLATEAU_GAIN`. A seed needs two scored rounds in the
    window at least :data:`PLATEAU_ROUNDS` apart; None when no seed has them."""
    key = "personal_ppl" if is_lm(rows) else "personal_acc"
    per_seed = {}
    for r in rows:
        if r["run"] != run or incomplete(r) or not r.get("out") or not (pathlib.Path(r["out"]) / "rounds.jsonl").is_file():
            continue
        scored = [(x["round"], x[key]) for x in _rounds(r["out"]) if x.get(key) is not None]
        if not scored:
            continue
        last = scored[-1][0]  # the run's last round: devices score it whatever their --score-every
        width = max(PLATEAU_ROUNDS + 1, -(-(last + 1) // PLATEAU_PART))  # rounds, rounded up
        window = [(n, y) for n, y in scored if n > last - width]  # devices may score every N-th round
        if len(window) < 2 or window[-1][0] - window[0][0] < PLATEAU_ROUNDS:
            continue
        n, y = (np.asarray(v, dtype=float) for v in zip(*window))
        slope = float(np.sum((n - n.mean()) * (y - y.mean())) / np.sum((n - n.mean()) ** 2))
        per_seed[r["seed"]] = -slope * PLATEAU_ROUNDS / float(y.mean()) if key == "personal_ppl" else slope * PLATEAU_ROUNDS
    if not per_seed:
        return None
    gain = float(np.mean(list(per_seed.values())))
    # every seed: two seeds moving opposite ways (one still improving, one past its best) can average under the bar
    return {"gain": gain, "per_seed": per_seed, "plateau": all(v < PLATEAU_GAIN for v in per_seed.values())}


def summarize(rows: Sequence[dict], reference: str) -> dict:
    """``{"reference", "lower_is_better", "intervals": {run: {metric: {mean, half, n}}}, "paired": {run:
    {metric: {mean, half, n, per_seed}}}}``; paired holds every other run and, for a classifier,
    :data:`FLOOR` and each fine-tuned baseline's global model (:data:`NO_FINE_TUNE`), when the reference ran."""
    runs = list(dict.fromkeys(r["run"] for r in rows))
    metrics, pairs = _measures(rows)
    intervals = {}
    for run in runs:
        intervals[run] = {}
        for key in metrics:
            vals = [v for v in _by_seed(rows, run, key).values() if v is not None]
            if vals:
                intervals[run][key] = _iv(t_interval(vals))
    paired: dict[str, dict] = {}
    if reference in runs:
        for run in runs:
            if run == reference:
                continue
            for key in pairs:
                got = paired_difference(_by_seed(rows, reference, key), _by_seed(rows, run, key))
                if got:
                    paired.setdefault(run, {})[key] = _iv(*got)
            if not is_lm(rows) and any(r["run"] == run and r.get("strategy") in FINE_TUNED for r in rows):
                got = paired_difference(_by_seed(rows, reference, "personal_acc"), _by_seed(rows, run, "global_own_acc"))
                if got:
                    paired[NO_FINE_TUNE.format(run=run)] = {"personal_acc": _iv(*got)}
        got = None if is_lm(rows) else paired_difference(_by_seed(rows, reference, "personal_acc"),
                                                         _by_seed(rows, reference, "label_prior_acc"))
        if got:
            paired[FLOOR] = {"personal_acc": _iv(*got)}
    plateaus = {run: got for run in runs if (got := plateau(rows, run)) is not None}
    return {"reference": reference, "lower_is_better": is_lm(rows), "intervals": intervals, "paired": paired,
            "plateau": plateaus}


def _cell(d: dict | None, digits: int = 3, signed: bool = False) -> str:
    return "—" if d is None else Interval(d["mean"], d["half"], d["n"]).format(digits, signed)


def _verdict(d: dict | None, lower_is_better: bool = False) -> str:
    return verdict(None if d is None else Interval(d["mean"], d["half"], d["n"]), lower_is_better=lower_is_better)


def markdown(suite, rows: Sequence[dict], report: dict, left_out: Sequence[str] | Mapping[str, str] = ()) -> str:
    """The suite's two tables (runs with 95% intervals; paired differences) and a line of settings.
    ``left_out``: the runs not run, or run -> why not."""
    cfg = suite.config
    lm = is_lm(rows)
    metrics, pairs = _measures(rows)
    seeds = sorted({r["seed"] for r in rows})
    runs = list(dict.fromkeys(r["run"] for r in rows))
    splits = {r["run"]: r["splits"] for r in rows}
    one = rows[0] if rows else {}
    what = "texts" if lm else "examples"
    out = [f"**{suite.name}**: {suite.what}. Seeds {', '.join(map(str, seeds))}; {cfg.clients} clients "
           f"({', '.join(cfg.profiles or ())}), {one.get('rounds', cfg.rounds)} rounds × τ = {one.get('local_steps', cfg.local_steps)}, "
           f"B = {cfg.batch_size}, T ≤ {cfg.max_seq}, {cfg.optimizer} lr {cfg.lr:g}, ≤ {cfg.max_train} train / "
           f"{cfg.max_test} test {what} per client. Mean ± 95% t-interval over seeds "
           f"(no ± with one seed)" + ("; perplexity: lower is better." if lm else "."), ""]
    digits = {"device_s": 0, "mb": 1, "eval_mb": 1, "train_s": 0, **{k: 2 for k in LM_METRICS if k.endswith("_ppl")}}
    out.append("| run | splits | " + " | ".join(metrics.values()) + " |")
    out.append("|---" * (len(metrics) + 2) + "|")
    for run in runs:
        iv = report["intervals"].get(run, {})
        out.append(f"| {run} | {splits[run]} | "
                   + " | ".join(_cell(iv.get(k), digits.get(k, 3)) for k in metrics) + " |")
    ref = report["reference"]
    if report["paired"]:
        d2 = 2 if lm else 3
        win = "wins/loses only when the interval excludes 0" + (
            "; a win is a lower perplexity (a negative Δ)." if lm else ".")
        out += ["", f"Paired differences, {ref} − run, seed by seed (same partition): mean ± 95% CI; {win}", "",
                f"| run | Δ personal{' ppl' if lm else ''} | per seed | verdict | Δ generalization{' ppl' if lm else ''} "
                "| per seed | verdict |", "|---|---|---|---|---|---|---|"]
        for run, d in report["paired"].items():
            cells = []
            for key in (("personal_acc", "generalization_acc") if run not in report["intervals"] else pairs):
                x = d.get(key)
                per = "—" if x is None else ", ".join(f"{v:+.{d2}f}" for _, v in sorted(x["per_seed"].items()))
                cells += [_cell(x, d2, True), per, _verdict(x, lm)]
            out.append(f"| {run} | " + " | ".join(cells) + " |")
        if lm:  # a causal LM has no labels, so no label prior: the classifier's floor does not apply
            out.append(f"| {FLOOR} | — | — | — | — | — | — |")
    if report.get("plateau"):
        what = ("relative fall of personal perplexity" if lm else "personal accuracy gained")
        out += ["", f"Trained to a plateau? The {what} per {PLATEAU_ROUNDS} rounds at the trend of the run's last "
                    f"third (a least-squares line through the rounds scored in it), mean over seeds "
                    f"(under {PLATEAU_GAIN:g} in every seed: a plateau): "
                + "; ".join(f"{run} {p['gain']:+.3f} ({', '.join(f'{v:+.3f}' for _, v in sorted(p['per_seed'].items()))})"
                            f"{'' if p['plateau'] else (' (still falling)' if lm else ' (still rising)')}"
                            for run, p in report["plateau"].items()) + "."]
    if left_out:
        why = dict(left_out) if isinstance(left_out, Mapping) else dict.fromkeys(left_out, "no such strategy on the "
                                                                                          "server yet")
        out += ["", "Not run: " + "; ".join(f"{n} ({w})" for n, w in why.items()) + "."]
    lost = [f"{r['run']} seed {r['seed']} ({r['clients_reported']} of {r['clients']})" for r in rows if incomplete(r)]
    if lost:
        own = "" if lm else "personal accuracy, "
        out += ["", f"Client metrics lost (a client's report dropped with its connection), so its {own}"
                    f"device time and bytes are left out of the means and pairs: {'; '.join(lost)}."]
    short = [f"{r['run']} seed {r['seed']} ("
             + "; ".join(f"round {k}: {', '.join(v)}" for k, v in sorted(r["dropped"].items(), key=lambda kv: int(kv[0])))
             + ")" for r in rows if r.get("dropped")]
    if short:
        out += ["", "Left out of an aggregation (the client's upload never reached the server, e.g. a step refused "
                    "after the middle's deadline), so the run trained on fewer client steps than its peers: "
                    f"{'; '.join(short)}."]
    unfit = sorted({u for r in rows for u in r.get("unfit", [])})
    if unfit:
        out += ["", f"Would not fit its device's memory (timed anyway): {'; '.join(unfit)}."]
    return "\n".join(out) + "\n"


def _rounds(out: str) -> list[dict]:
    return [json.loads(line) for line in (pathlib.Path(out) / "rounds.jsonl").read_text().splitlines() if line]


def plot_suite(suite, rows: Sequence[dict], path: pathlib.Path) -> pathlib.Path:
    """Two panels: mean personal accuracy per round vs device time (the clock's; wall time here
    when the suite names no profiles), with the final round's 95% interval; and final
    generalization ± 95% CI vs device time. One colour per run. A causal LM's suite plots
    perplexity instead (lower is better; its rounds with a server evaluation, with ``eval_every`` 0
    the last alone), with the pretrained model's own-text perplexity as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from flexsfl.core.atomic import atomic_path

    runs = list(dict.fromkeys(r["run"] for r in rows))
    lm = is_lm(rows)
    own, gen = ("personal_ppl", "generalization_ppl") if lm else ("personal_acc", "generalization_acc")
    clock = all(r.get("device_s") is not None for r in rows)
    xkey = "device_s" if clock else "elapsed_s"
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    xs_all: list[float] = []
    pre: list[float] = []  # an LM: the pretrained model's own-text perplexity, per run and seed
    for i, run in enumerate(runs):
        color = f"C{i % 10}"
        per_seed = [_rounds(r["out"]) for r in rows if r["run"] == run and not incomplete(r)]
        if not per_seed:
            continue
        n = min(len(rs) for rs in per_seed)
        scored = [k for k in range(n) if any(rs[k].get(own) is not None for rs in per_seed)]  # an LM: its eval rounds
        if not scored:
            continue
        x = [float(np.mean([rs[k][xkey] for rs in per_seed])) for k in scored]
        y = [float(np.mean([rs[k][own] for rs in per_seed if rs[k].get(own) is not None])) for k in scored]
        xs_all += x
        axes[0].plot(x, y, marker="o", ms=3 if len(x) > 1 else 5, color=color, label=run)
        last = [rs[scored[-1]][own] for rs in per_seed if rs[scored[-1]].get(own) is not None]
        if len(last) > 1:
            axes[0].errorbar(x[-1], np.mean(last), yerr=t_interval(last).half, color=color, capsize=3)
        g = [r[gen] for r in rows if r["run"] == run and r.get(gen) is not None]
        if g:
            iv = t_interval(g)
            axes[1].errorbar(x[-1], iv.mean, yerr=iv.half or 0, fmt="o", color=color, capsize=3, label=run)
        if lm:
            pre.extend(r["pretrained_ppl"] for r in rows if r["run"] == run and r.get("pretrained_ppl") is not None)
    log_x = bool(xs_all) and min(xs_all) > 0 and max(xs_all) / min(xs_all) > 20
    xlabel = "device time for the profiles (s, the clock)" if clock else "training wall time here (s)"
    titles = (("personal model's perplexity on its own held-out text, mean over seeds (± 95% CI)",
               "generalization: personal model on the other clients' text, ± 95% CI") if lm else
              ("personal accuracy (own test split), mean over seeds",
               "generalization (personal model, union test), final, ± 95% CI"))
    for ax, title in zip(axes, titles):
        ax.set_xlabel(xlabel + (", log scale" if log_x else ""))
        if lm:
            ax.set_ylabel("perplexity (lower is better)")
        else:
            ax.set_ylabel("accuracy")
            ax.set_ylim(0, 1.02)  # an interval over 2 seeds (t = 12.7) may reach past [0, 1]
        ax.set_title(title, fontsize=10)
        if log_x:
            ax.set_xscale("log")
        ax.grid(alpha=0.3)
    if pre:
        axes[0].axhline(float(np.mean(pre)), color="grey", ls="--", lw=1, label="pretrained (own text)")
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"{suite.name}: {suite.what} ({len({r['seed'] for r in rows})} seeds)", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path
