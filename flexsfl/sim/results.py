"""A simulated federation's results: the server's events joined into one row per round
(``rounds.jsonl``), a summary (``summary.json``), the accuracy-vs-time plot and the end-of-run table.

Accounting (issue 18), the same for every strategy:

- ``bytes``: training traffic only (Z, g, adapters, control), cumulative over rounds;
  ``eval_bytes`` apart: what a split client sends and receives to score its own test split on
  the server's tail (a whole-model client scores on the device and sends nothing).
- Accuracies are named for the model they measure (:data:`OWN_MODEL`): ``global_acc`` is the
  global model on the union test set, ``global_own_acc`` the same global model on each client's
  own test split (mean over clients); ``personal_acc`` is the model each client ends its round
  with, on its own test split — a *personal* model for FlexP-SFL, FedPer/FedRep (own head), Ditto
  (``v_k``) and local-only, but for SplitFed and FedAvg *global + local fine-tune*: the round's
  global model after the client's τ local steps (the steps it trains anyway, no extra compute),
  which is not the global model. ``generalization_acc`` is the uploaded model on the union test
  set, so not measured for Ditto (``v_k`` never leaves the device). ``accuracy_of`` in every row
  and the summary says which.
- A causal LM: ``personal_ppl`` etc. (lower is better) where the server scores them (the last round,
  or every ``eval_every``); in the other rounds ``personal_ppl`` is what the devices measured of
  the same personal models on their own held-out texts, so each run has a perplexity curve.
- ``label_prior_acc``: the floor any personalization must beat: the global model with each
  client's training label prior (:func:`flexsfl.sim.evaluation.label_prior_accuracies`).
- ``device_s``: the round ends on the device clock (:mod:`flexsfl.sim.clock`) when the run
  named device profiles, beside ``elapsed_s``, the wall time on this machine.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import pathlib
from typing import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from flexsfl.core.atomic import atomic_path, atomic_write_text
from flexsfl.core.errors import FlexSFLError
from flexsfl.server_backend.strategy import STRATEGIES
from flexsfl.sim.clock import DeviceClock, run_clients
from flexsfl.sim.config import SimConfig

PPL_KEYS = ("personal_ppl", "global_ppl", "pretrained_ppl", "generalization_ppl")  # causal LM, mean over clients

__all__ = ["PPL_KEYS", "layout", "FINE_TUNE", "OWN_MODEL", "accuracy_of", "collect", "plot", "table", "lm_table"]

log = logging.getLogger("flexsfl.results")

# What ``personal_acc`` measures, per strategy (anything not named here keeps a personal model).
FINE_TUNE = "global + local fine-tune"
OWN_MODEL = {"splitfed": FINE_TUNE, "fedavg": FINE_TUNE, "local": "local only",
             "fedper": "personal head + locally trained global body", "fedrep": "personal head + locally trained global body",
             "ditto": "Ditto personal (v_k)"}


def accuracy_of(strategy: str) -> dict[str, str]:
    """What each accuracy of a run of ``strategy`` measures, in words (stored beside the numbers)."""
    own = OWN_MODEL.get(strategy, "personal")
    return {"global_acc": "global model, union test set", "global_own_acc": "global model, the client's own test split",
            "personal_acc": f"{own} model, the client's own test split",
            "generalization_acc": (f"{own} model, union test set" if STRATEGIES[strategy].uploads_own_model
                                   else f"not measured: the {own} model never leaves the device"),
            "label_prior_acc": "global model + the client's training label prior (no training), own test split"}


def collect(cfg: SimConfig, out: pathlib.Path, partition, splits: list[int], why: list[dict], total_s: float) -> dict:
    """Join the server's events into one row per round, and a summary."""
    events = [json.loads(line) for line in (out / "server" / "metrics.jsonl").read_text().splitlines() if line]
    rounds: dict[int, dict] = {}
    server_ms: dict[tuple[str, int], list[float]] = {}
    for e in events:
        if e["event"] == "step":
            server_ms.setdefault((e["client"], e["round"]), []).append(e["server_ms"])
    for e in events:
        r = e.get("round")
        if e["event"] == "round":
            rounds.setdefault(r, {})["round_s"] = e["seconds"]
            rounds[r]["server_steps"] = e.get("server_steps")  # optimizer steps (fixed schedule): equal across strategies
            rounds[r]["dropped"] = list(e.get("dropped", []))  # started the round, never uploaded: not aggregated
        elif e["event"] == "eval":
            rounds.setdefault(r, {}).update({k: v for k, v in e.items() if k not in ("t", "event", "round")})
        elif e["event"] == "client_metrics":
            m = {**e.get("metrics", {}), "split": e.get("split")}  # the client's own keys are nested
            srv = server_ms.get((e["client"], r), [])
            if srv:
                m["server_ms"] = float(np.mean(srv))
                m["wire_ms"] = max(m.get("roundtrip_ms", 0.0) - m["server_ms"], 0.0)
            rounds.setdefault(r, {}).setdefault("clients", {})[e["client"]] = m
    rows, elapsed = [], 0.0
    try:
        costs = run_clients(cfg, splits, [w.get("top") for w in why])  # a U-shaped client: its top
    except (FlexSFLError, KeyError, ValueError) as e:  # a model the cost model cannot read: report without device time
        log.warning("no device time for this run: %s", e)
        costs = None
    clock = DeviceClock() if costs else None
    eval_total: dict[str, int] = {}  # client -> cumulative evaluation bytes
    for r in sorted(rounds):
        row = rounds[r]
        elapsed += row.get("round_s", 0.0)
        clients = row.get("clients", {})
        for cid, c in clients.items():
            eval_total[cid] = eval_total.get(cid, 0) + c.get("eval_bytes_sent", 0) + c.get("eval_bytes_received", 0)
            c["train_bytes"] = c.get("bytes_sent", 0) + c.get("bytes_received", 0) - eval_total[cid]  # cumulative
        personal = [c["personal_acc"] for c in clients.values() if "personal_acc" in c]
        device = clock.advance([(costs[cid], c.get("steps", cfg.local_steps)) for cid, c in sorted(clients.items())
                                if cid in costs]) if clock and clients else None
        rows.append({
            "round": r, "strategy": cfg.strategy, "elapsed_s": round(elapsed, 3),
            "device_s": round(clock.now, 3) if clock else None,
            **({"device_round_s": round(device.seconds, 3), "straggler": device.straggler} if device else {}),
            "global_acc": row.get("global_acc"),
            "personal_acc": float(np.mean(personal)) if personal else None,
            "generalization_acc": float(np.mean(list(row["generalization"].values()))) if row.get("generalization") else None,
            "global_own_acc": float(np.mean(list(row["global_own"].values()))) if row.get("global_own") else None,
            "label_prior_acc": float(np.mean(list(row["label_prior"].values()))) if row.get("label_prior") else None,
            **(_mean_ppl(row.get("lm")) or _device_ppl(clients)),
            "bytes": int(sum(c["train_bytes"] for c in clients.values())),
            "server_steps": row.get("server_steps"), "dropped": row.get("dropped", []),
            "eval_bytes": int(sum(eval_total.get(cid, 0) for cid in clients)),
            "accuracy_of": accuracy_of(cfg.strategy),
            **{k: row[k] for k in ("generalization", "personal_server", "label_prior", "global_own", "lm") if k in row},
            "clients": clients,
        })
    atomic_write_text(out / "rounds.jsonl", "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows))
    last = rows[-1] if rows else {}
    per_client = []
    for k, s in enumerate(splits):
        cid = f"c{k}"
        c = last.get("clients", {}).get(cid, {})
        per_client.append({
            "client": cid, "groups": list(partition.clients[k].groups), "split": s, "choice": why[k],
            "personal_acc": c.get("personal_acc"), "generalization_acc": last.get("generalization", {}).get(cid),
            "label_prior_acc": last.get("label_prior", {}).get(cid), "global_own_acc": last.get("global_own", {}).get(cid),
            "step_ms": c.get("client_compute_ms", 0.0) + c.get("roundtrip_ms", 0.0),
            "tokens_per_s": c.get("tokens_per_s"),  # the device's own compute
            # the split selection's prediction for the device profile (not this machine)
            "predicted_step_ms": 1e3 * why[k]["predicted"]["time_s"] if "predicted" in why[k] else None,
            "client_compute_ms": c.get("client_compute_ms"), "wire_ms": c.get("wire_ms"), "server_ms": c.get("server_ms"),
            "bytes": c.get("train_bytes", 0), "eval_bytes": eval_total.get(cid, 0),
            **({"device_round_s": round(clock.rounds[-1].per_client[cid], 3) if cid in clock.rounds[-1].per_client else None,
                "fits": costs[cid].fits, "predicted_memory_mb": round(costs[cid].memory_mb or 0.0, 1)}
               if clock and clock.rounds and cid in costs else {}),
            **last.get("lm", {}).get(cid, {}),  # causal LM: perplexities (personal, global, pretrained, generalization)
        })
    target = _time_to(rows, cfg.target_acc, lower=False) if cfg.task != "causal_lm" else _time_to(
        rows, cfg.target_ppl, key="personal_ppl", lower=True)
    summary = {
        "config": dataclasses.asdict(cfg), "total_s": round(total_s, 1), "rounds": len(rows),
        "final": {k: last.get(k) for k in ("global_acc", "global_own_acc", "personal_acc", "generalization_acc",
                                           "label_prior_acc", *PPL_KEYS, "elapsed_s", "device_s", "bytes", "eval_bytes")},
        "accuracy_of": accuracy_of(cfg.strategy), "target": target, "per_client": per_client,
        # clients whose training would not fit their profile's memory: the run shows what such devices could not do
        "unfit": sorted(f"{cid} ({c.profile}: {c.memory_mb:.0f} MB)" for cid, c in (costs or {}).items() if not c.fits),
        # round -> clients left out of its aggregation (their upload never came): this run trained on fewer client
        # steps than its peers did, so it is not an equal-budget comparison
        "dropped": {str(row["round"]): row["dropped"] for row in rows if row["dropped"]},
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _device_ppl(clients: dict) -> dict:
    """A causal-LM round the server did not score: the personal perplexity its devices measured on their own
    held-out texts (the same model and texts as the server's scoring; {} for a classifier)."""
    vals = [c["personal_ppl"] for c in clients.values() if c.get("personal_ppl") is not None]
    return {"personal_ppl": float(np.mean(vals))} if vals else {}


def _mean_ppl(lm: dict | None) -> dict:
    """A causal-LM round's perplexities averaged over clients (lower is better); {} for a classifier."""
    if not lm:
        return {}
    out = {}
    for key in PPL_KEYS:
        vals = [c[key] for c in lm.values() if c.get(key) is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def _time_to(rows: list[dict], target: float | None, *, key: str = "personal_acc", lower: bool = False) -> dict:
    """Wall time, device time and training bytes until the mean ``key`` first reaches ``target``
    (at least it; at most it when ``lower`` is better, as for perplexity). ``target_acc`` (or
    ``target_ppl``) echoes the target; None: no target, nothing reached."""
    name = "target_ppl" if key.endswith("_ppl") else "target_acc"
    for row in rows if target is not None else ():  # client counters are cumulative
        v = row.get(key)
        if v is not None and (v <= target if lower else v >= target):
            return {name: target, "round": row["round"], "elapsed_s": row["elapsed_s"],
                    "device_s": row.get("device_s"), "bytes": row["bytes"]}
    return {name: target, "round": None, "elapsed_s": None, "device_s": None, "bytes": None}


def plot(summaries: Sequence[tuple[str, pathlib.Path]], path: pathlib.Path) -> pathlib.Path:
    """Accuracy vs wall time here, one line per run (rounds.jsonl of each); and vs device time
    (:mod:`flexsfl.sim.clock`) in a third panel when the runs named device profiles."""
    import matplotlib  # the bench extra: only a finished run draws, so only it needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [(label, [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line])
            for label, out in summaries]
    # A causal LM is scored by perplexity (lower is better) where a classifier has accuracy.
    lm = any(r.get("personal_ppl") is not None for _, rows in runs for r in rows)
    own, glob = ("personal_ppl", "global_ppl") if lm else ("personal_acc", "global_acc")
    measure = "perplexity (lower is better)" if lm else "accuracy"
    device = any(r.get("device_s") is not None for _, rows in runs for r in rows)
    fig, axes = plt.subplots(1, 3 if device else 2, figsize=(16 if device else 11, 4))
    for label, rows in runs:
        scored = [r for r in rows if r.get(glob) is not None]  # an LM's global model: on the server's eval rounds only
        rows = [r for r in rows if r.get(own) is not None]
        axes[0].plot([r["elapsed_s"] for r in rows], [r[own] for r in rows], marker="o", label=label)
        axes[1].plot([r["elapsed_s"] for r in scored], [r[glob] for r in scored], marker="o", label=label)
        if device and rows and rows[0].get("device_s") is not None:
            axes[2].plot([r["device_s"] for r in rows], [r[own] for r in rows], marker="o", label=label)
    word = "perplexity" if lm else "accuracy"
    titles = (f"{word} of each client's own model (own test split)",
              f"global model {word} ({'each client' + chr(39) + 's own text' if lm else 'union test'})",
              f"own model's {word} vs predicted device time")
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_xlabel("device time for the profiles (s)" if i == 2 else "training wall time here (s)")
        ax.set_ylabel(measure)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path



def lm_table(summary: dict) -> str:
    """The per-client table of a causal-LM run: perplexity (lower is better) on own and others' held-out text."""
    t = Table(title=f"{summary['config']['strategy']} causal LM on {summary['config']['data']} "
                    f"({summary['rounds']} rounds, {summary['final']['elapsed_s']:.0f} s of training); perplexity")
    for col in ("client", "data", "split", "personal", "global", "pretrained", "generalization", "bytes/token", "step ms",
                "tokens/s"):
        t.add_column(col, justify="left" if col in ("client", "data") else "right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for c in summary["per_client"]:
        t.add_row(c["client"], _groups(c), layout(c), fmt(c.get("personal_ppl")), fmt(c.get("global_ppl")),
                  fmt(c.get("pretrained_ppl")), fmt(c.get("generalization_ppl")), fmt(c.get("bytes_per_token")),
                  f"{c['step_ms']:.0f}", "-" if not c.get("tokens_per_s") else f"{c['tokens_per_s']:.0f}")
    console = Console(record=True, width=150, file=io.StringIO())
    console.print(t)
    console.print("personal: the client's own layers (head; and top in U mode) + the global rest; global: the global "
                  "model; pretrained: before training; "
                  "all on the client's own held-out text; generalization: personal model on the other clients' texts; "
                  "tokens/s: trained tokens per second of the device's own compute")
    return console.export_text()


def layout(c: dict) -> str:
    """A client's split, and ``+top`` for a U-shaped one (``3+1``: 3 head blocks, 1 top block + task head)."""
    top = (c.get("choice") or {}).get("top")
    return f"{c['split']}" + ("" if top is None else f"+{top}")


def _groups(c: dict) -> str:
    """A client's data groups for a table cell ("-" for data without a group column)."""
    g = c.get("groups") or []
    return (g[0] + (f" +{len(g) - 1}" if len(g) > 1 else "")) if g else "-"


def table(summary: dict) -> str:
    """The per-client table printed at the end of a run."""
    if summary["config"].get("task") == "causal_lm":
        return lm_table(summary)
    strategy = summary["config"]["strategy"]
    own = OWN_MODEL.get(strategy, "personal")
    t = Table(title=f"{strategy} on {summary['config']['data']} "
                    f"({summary['rounds']} rounds, {summary['final']['elapsed_s']:.0f} s of training)")
    device = any(c.get("device_round_s") is not None for c in summary["per_client"])
    for col in ("client", "data", "profile", "split", f"{own} acc", "global acc", "global+prior acc", "generalization acc", "step ms",
                "of which wire ms", "predicted ms", *(("device s/round",) if device else ()), "MB", "eval MB"):
        t.add_column(col, justify="right" if col not in ("client", "data", "profile") else "left")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c in summary["per_client"]:
        pred = c.get("predicted_step_ms")
        dev = c.get("device_round_s")
        dev_cell = ("-" if dev is None else f"{dev:.1f}") + ("" if c.get("fits", True) else " (does not fit)")
        t.add_row(c["client"], _groups(c), c["choice"].get("profile", "pinned"), layout(c), fmt(c["personal_acc"]),
                  fmt(c.get("global_own_acc")), fmt(c.get("label_prior_acc")), fmt(c["generalization_acc"]), f"{c['step_ms']:.0f}",
                  "-" if c["wire_ms"] is None else f"{c['wire_ms']:.1f}",
                  "-" if pred is None else f"{pred:.0f}",
                  *((dev_cell,) if device else ()),
                  f"{c['bytes'] / 1e6:.1f}", f"{c.get('eval_bytes', 0) / 1e6:.1f}")
    f = summary["final"]
    console = Console(record=True, width=190, file=io.StringIO())
    console.print(t)
    console.print(f"global model accuracy {fmt(f['global_acc'])} (union test), {fmt(f.get('global_own_acc'))} (mean of "
                  f"own test splits); mean {own} {fmt(f['personal_acc'])} (own test split) "
                  f"against the floor, global + label prior, {fmt(f.get('label_prior_acc'))}; "
                  f"mean generalization {fmt(f['generalization_acc'])} (union test)")
    if f.get("device_s") is not None:
        console.print(f"device time {f['device_s']:.1f} s for the profiles (slowest client per round), "
                      f"wall time here {f['elapsed_s']:.1f} s"
                      + (f"; does not fit its device's memory: {', '.join(summary['unfit'])}"
                         if summary.get("unfit") else ""))
    console.print("MB: training traffic; eval MB: scoring each client's own test split on the server's tail, counted apart")
    if any(c.get("predicted_step_ms") for c in summary["per_client"]):
        console.print("step ms: measured here (client compute + round trip); predicted ms: the split selection's "
                      "estimate for the device profile, which this machine only plays")
    return console.export_text()
