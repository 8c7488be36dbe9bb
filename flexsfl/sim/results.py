"""A simulated federation's results: the server's events joined into one row per round
(``rounds.jsonl``), a summary (``summary.json``), the accuracy-vs-time plot and the end-of-run table."""

from __future__ import annotations

import dataclasses
import io
import json
import pathlib
from typing import Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from flexsfl.core.atomic import atomic_path, atomic_write_text
from flexsfl.sim.config import SimConfig

__all__ = ["collect", "plot", "table", "lm_table"]


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
    for r in sorted(rounds):
        row = rounds[r]
        elapsed += row.get("round_s", 0.0)
        clients = row.get("clients", {})
        personal = [c["personal_acc"] for c in clients.values() if "personal_acc" in c]
        rows.append({
            "round": r, "strategy": cfg.strategy, "elapsed_s": round(elapsed, 3),
            "global_acc": row.get("global_acc"),
            "personal_acc": float(np.mean(personal)) if personal else None,
            "generalization_acc": float(np.mean(list(row["generalization"].values()))) if "generalization" in row else None,
            "bytes": int(sum(c.get("bytes_sent", 0) + c.get("bytes_received", 0) for c in clients.values())),
            **{k: row[k] for k in ("generalization", "personal_server", "lm") if k in row},
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
            "step_ms": c.get("client_compute_ms", 0.0) + c.get("roundtrip_ms", 0.0),
            # the split selection's prediction for the device profile (not this machine)
            "predicted_step_ms": 1e3 * why[k]["predicted"]["time_s"] if "predicted" in why[k] else None,
            "client_compute_ms": c.get("client_compute_ms"), "wire_ms": c.get("wire_ms"), "server_ms": c.get("server_ms"),
            "bytes": c.get("bytes_sent", 0) + c.get("bytes_received", 0),
            **last.get("lm", {}).get(cid, {}),  # causal LM: perplexities (personal, global, pretrained, generalization)
        })
    target = _time_to(rows, cfg.target_acc)
    summary = {
        "config": dataclasses.asdict(cfg), "total_s": round(total_s, 1), "rounds": len(rows),
        "final": {k: last.get(k) for k in ("global_acc", "personal_acc", "generalization_acc", "elapsed_s", "bytes")},
        "target": target, "per_client": per_client,
    }
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary


def _time_to(rows: list[dict], target: float) -> dict:
    """Wall time and bytes until the mean personalized accuracy first reaches ``target``."""
    total_bytes = 0
    for row in rows:
        total_bytes = row["bytes"]  # client counters are cumulative
        if row.get("personal_acc") is not None and row["personal_acc"] >= target:
            return {"target_acc": target, "round": row["round"], "elapsed_s": row["elapsed_s"], "bytes": total_bytes}
    return {"target_acc": target, "round": None, "elapsed_s": None, "bytes": None}


def plot(summaries: Sequence[tuple[str, pathlib.Path]], path: pathlib.Path) -> pathlib.Path:
    """Accuracy vs wall time, one line per run (rounds.jsonl of each)."""
    import matplotlib  # the bench extra: only a finished run draws, so only it needs matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, out in summaries:
        rows = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines() if line]
        t = [r["elapsed_s"] for r in rows]
        axes[0].plot(t, [r["personal_acc"] for r in rows], marker="o", label=label)
        axes[1].plot(t, [r["global_acc"] for r in rows], marker="o", label=label)
    for ax, title in zip(axes, ("personalized accuracy (own test split)", "global model accuracy (union test)")):
        ax.set_xlabel("training wall time (s)")
        ax.set_ylabel("accuracy")
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
    for col in ("client", "data", "split", "personal", "global", "pretrained", "generalization", "bytes/token", "step ms"):
        t.add_column(col, justify="left" if col in ("client", "data") else "right")
    fmt = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    for c in summary["per_client"]:
        t.add_row(c["client"], c["groups"][0], str(c["split"]), fmt(c.get("personal_ppl")), fmt(c.get("global_ppl")),
                  fmt(c.get("pretrained_ppl")), fmt(c.get("generalization_ppl")), fmt(c.get("bytes_per_token")),
                  f"{c['step_ms']:.0f}")
    console = Console(record=True, width=150, file=io.StringIO())
    console.print(t)
    console.print("personal: the client's head + global tail; global: the global model; pretrained: before training; "
                  "all on the client's own held-out text; generalization: personal model on the other clients' texts")
    return console.export_text()


def table(summary: dict) -> str:
    """The per-client table printed at the end of a run."""
    if summary["config"].get("task") == "causal_lm":
        return lm_table(summary)
    t = Table(title=f"{summary['config']['strategy']} on {summary['config']['data']} "
                    f"({summary['rounds']} rounds, {summary['final']['elapsed_s']:.0f} s of training)")
    for col in ("client", "data", "profile", "split", "personal acc", "generalization acc", "step ms",
                "of which wire ms", "predicted ms", "MB"):
        t.add_column(col, justify="right" if col not in ("client", "data", "profile") else "left")
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    for c in summary["per_client"]:
        groups = c["groups"][0] + (f" +{len(c['groups']) - 1}" if len(c["groups"]) > 1 else "")
        pred = c.get("predicted_step_ms")
        t.add_row(c["client"], groups, c["choice"].get("profile", "pinned"), str(c["split"]), fmt(c["personal_acc"]),
                  fmt(c["generalization_acc"]), f"{c['step_ms']:.0f}", "-" if c["wire_ms"] is None else f"{c['wire_ms']:.1f}",
                  "-" if pred is None else f"{pred:.0f}", f"{c['bytes'] / 1e6:.1f}")
    f = summary["final"]
    console = Console(record=True, width=150, file=io.StringIO())
    console.print(t)
    console.print(f"global model accuracy {fmt(f['global_acc'])}; mean personalized {fmt(f['personal_acc'])}; "
                  f"mean generalization {fmt(f['generalization_acc'])}")
    if any(c.get("predicted_step_ms") for c in summary["per_client"]):
        console.print("step ms: measured here (client compute + round trip); predicted ms: the split selection's "
                      "estimate for the device profile, which this machine only plays")
    return console.export_text()
