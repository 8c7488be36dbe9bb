"""Accuracy vs time: FlexP-SFL against its baselines, on the same engine, data and seeds.

    flexsfl bench accuracy [--rounds 5] [--out results/accuracy] [--strategies flexpsfl,...]
    flexsfl bench accuracy --task causal-lm [--strategies flexpsfl,local]     # SmolLM2, perplexity
    flexsfl bench accuracy --suite supersense-a0.1 [--seeds 3] [--strategies ...]   # several seeds, paired CIs

Runs ``flexsfl simulate`` once per strategy (clients are separate processes on loopback) on the
VADER domains with MiniLM — the demo's setting — and writes, under ``--out``: one directory per
run, ``accuracy.json`` (one row per strategy), ``accuracy.md`` (the table for
``benchmarks/README.md``) and ``accuracy_vs_time.png``. With ``--task causal-lm`` the runs are the
LM demo's (SmolLM2 on one VADER domain per device) and every accuracy becomes a perplexity (lower is
better): per round, the mean over clients of the personal, global, pretrained and generalization
perplexity, in the table, the JSON and the plot. With ``--suite`` the runs are a suite's
(:mod:`flexsfl.benchmarks.suites`: WordNet supersenses under label skew, VADER domains), once per
seed, reported as means with 95% intervals and paired differences against FlexP-SFL
(:mod:`flexsfl.benchmarks.stats`), against device time.

Strategies (``name: what``):

- ``flexpsfl``: personal heads, split per device profile, layer-wise aggregation, alignment λ=0.1
- ``flexpsfl-l0``, ``flexpsfl-l0.01``, ``flexpsfl-l1``: the same with λ = 0 (no alignment), 0.01, 1: the λ sweep
- ``flexpsfl-logit``, ``flexpsfl-logit-l1``: the alignment term at the logits instead (``--align logit-kl``:
  the server's KL of the global tail's logits for Z' and Z), λ = 0.1 and 1
- ``flexpsfl-u``: FlexP-SFL-U, the label-private U-shaped topology: each device also keeps the last
  blocks + task head (personal); (split, top) per device profile; alignment as ``flexpsfl``;
  ``flexpsfl-u-l0``, ``flexpsfl-u-l1``: λ = 0, 1
- ``flexpsfl-u-top``, ``flexpsfl-u-top-l1``: FlexP-SFL-U with the alignment term also at the top's input
  (``--align-top``: the personal top's input H pulled toward the global middle's H′), λ = 0.1 and 1
- ``splitfed``: SplitFed/SplitLoRA: one fixed split for all, no personalization
- ``fedavg``: FedAvg-LoRA, the whole model on every device
- ``fedper``: FedPer, the whole model on the device, personal task head, body averaged
- ``fedrep``: FedRep, as FedPer but each round trains the head alone first, then the body alone
- ``ditto``: Ditto, FedAvg's global model plus a proximal personal model on each device (2τ device steps a round)
- ``local``: every device fine-tunes the whole model alone
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import time

from flexsfl.core.constants import ALIGN_LAMBDA
from flexsfl.sim.results import PPL_KEYS, layout

__all__ = ["RUNS", "add_arguments", "main", "run_accuracy", "row"]

RUNS: dict[str, dict] = {
    "flexpsfl": {"strategy": "flexpsfl", "align_lambda": ALIGN_LAMBDA},
    "flexpsfl-l0": {"strategy": "flexpsfl", "align_lambda": 0.0},
    "flexpsfl-l0.01": {"strategy": "flexpsfl", "align_lambda": 0.01},
    "flexpsfl-l1": {"strategy": "flexpsfl", "align_lambda": 1.0},
    "flexpsfl-logit": {"strategy": "flexpsfl", "align_lambda": ALIGN_LAMBDA, "alignment": "logit_kl"},
    "flexpsfl-logit-l1": {"strategy": "flexpsfl", "align_lambda": 1.0, "alignment": "logit_kl"},
    "flexpsfl-u": {"strategy": "flexpsfl-u", "align_lambda": ALIGN_LAMBDA},
    "flexpsfl-u-l0": {"strategy": "flexpsfl-u", "align_lambda": 0.0},
    "flexpsfl-u-l1": {"strategy": "flexpsfl-u", "align_lambda": 1.0},
    "flexpsfl-u-top": {"strategy": "flexpsfl-u", "align_lambda": ALIGN_LAMBDA, "align_top": True},
    "flexpsfl-u-top-l1": {"strategy": "flexpsfl-u", "align_lambda": 1.0, "align_top": True},
    "splitfed": {"strategy": "splitfed", "align_lambda": 0.0},
    "fedavg": {"strategy": "fedavg", "align_lambda": 0.0},
    "fedper": {"strategy": "fedper", "align_lambda": 0.0},
    "fedrep": {"strategy": "fedrep", "align_lambda": 0.0},
    "ditto": {"strategy": "ditto", "align_lambda": 0.0},
    "local": {"strategy": "local", "align_lambda": 0.0},
    # on request only (suites.ON_REQUEST): FlexP-SFL with one server step per 4 client steps (the mean of their
    # gradients) — with 4 clients, the shared part then takes as many optimizer steps a round as one client does
    "flexpsfl-k4": {"strategy": "flexpsfl", "align_lambda": ALIGN_LAMBDA, "server_step_every": 4},
}


def row(name: str, summary: dict) -> dict:
    """One run's row of the tables and JSON, from its ``summary.json``."""
    from flexsfl.core.wire import RoundMode
    from flexsfl.server_backend.strategy import STRATEGIES

    f, t = summary["final"], summary["target"]
    strategy = summary["config"]["strategy"]
    return {
        "run": name, "strategy": strategy, "align_lambda": summary["config"]["align_lambda"],
        "task": summary["config"].get("task", "seq_cls"), "seed": summary["config"]["seed"],
        "rounds": summary["config"]["rounds"], "local_steps": summary["config"]["local_steps"],  # as run
        "splits": ("whole model" if STRATEGIES[strategy].mode is RoundMode.FULL
                   else ",".join(layout(c) for c in summary["per_client"])),
        "personal_acc": f["personal_acc"], "generalization_acc": f["generalization_acc"], "global_acc": f["global_acc"],
        "label_prior_acc": f.get("label_prior_acc"),  # the floor: global model + each client's label prior
        "global_own_acc": f.get("global_own_acc"),  # the global model on each client's own split (SplitFed/FedAvg's "global")
        **{k: f.get(k) for k in PPL_KEYS},  # causal LM: mean perplexities over clients (lower is better)
        "train_s": f["elapsed_s"], "total_s": summary["total_s"], "mb": (f["bytes"] or 0) / 1e6,
        "eval_mb": (f.get("eval_bytes") or 0) / 1e6, "device_s": f.get("device_s"), "unfit": summary.get("unfit", []),
        # clients whose last-round metrics reached the server (a metrics message lost to a reconnect is missing)
        "clients": len(summary["per_client"]),
        "clients_reported": sum(c.get("personal_acc") is not None for c in summary["per_client"]),
        "dropped": summary.get("dropped", {}),  # round -> clients whose upload never came (not aggregated)
        "target_acc": t.get("target_acc"), "target_ppl": t.get("target_ppl"), "time_to_target_s": t["elapsed_s"],
        "mb_to_target": None if t["bytes"] is None else t["bytes"] / 1e6, "round_to_target": t["round"],
    }


def _markdown(rows: list[dict]) -> str:
    fmt = lambda v, p=3: "—" if v is None else f"{v:.{p}f}"  # noqa: E731
    if rows and rows[0].get("task") == "causal_lm":
        target = rows[0].get("target_ppl")
        head = ("| run | splits | personal ppl | generalization ppl | global ppl | pretrained ppl | "
                f"rounds to ppl {'—' if target is None else f'{target:.1f}'} | time to it (s) | MB to it | "
                "training time (s) | MB total |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
        return head + "\n".join(
            f"| {r['run']} | {r['splits']} | {fmt(r['personal_ppl'], 2)} | {fmt(r['generalization_ppl'], 2)} | "
            f"{fmt(r['global_ppl'], 2)} | {fmt(r['pretrained_ppl'], 2)} | "
            f"{'—' if r['round_to_target'] is None else r['round_to_target'] + 1} | {fmt(r['time_to_target_s'], 0)} | "
            f"{fmt(r['mb_to_target'], 1)} | {fmt(r['train_s'], 0)} | {fmt(r['mb'], 1)} |" for r in rows) + "\n"
    head = (f"| run | splits | personalized acc | generalization acc | global acc | rounds to {rows[0]['target_acc']:.2f} | "
            "time to it (s) | MB to it | training time (s) | MB total |\n|---|---|---|---|---|---|---|---|---|---|\n")
    lines = [
        f"| {r['run']} | {r['splits']} | {fmt(r['personal_acc'])} | {fmt(r['generalization_acc'])} | "
        f"{fmt(r['global_acc'])} | {'—' if r['round_to_target'] is None else r['round_to_target'] + 1} | "
        f"{fmt(r['time_to_target_s'], 0)} | {fmt(r['mb_to_target'], 1)} | {fmt(r['train_s'], 0)} | "
        f"{fmt(r['mb'], 1)} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from flexsfl.benchmarks.suites import SUITES

    p.add_argument("--strategies", default=None, help=f"comma-separated, from {', '.join(RUNS)} (default: all; with "
                                                      "--suite, all the server registers)")
    p.add_argument("--suite", choices=tuple(SUITES), default=None,
                   help="run a suite (fixed clients, splits, rounds, data) once per seed: means with 95%% CIs, paired "
                        "differences against FlexP-SFL, accuracy vs device time; "
                        + "; ".join(f"{s.name}: {s.what}" for s in SUITES.values()))
    p.add_argument("--seeds", type=int, default=None, help="--suite: seeds 0..N-1 (default: the suite's, 3)")
    p.add_argument("--report-only", action="store_true",
                   help="--suite: run nothing; rebuild the tables, JSON and PNG from the runs finished under --out")
    p.add_argument("--task", choices=("seq_cls", "causal-lm"), default="seq_cls",
                   help="seq_cls: the demo (MiniLM, accuracy); causal-lm: the LM demo (SmolLM2, perplexity, lower is "
                        "better)")
    p.add_argument("--model", default=None, help="model of every run (default: the chosen demo's)")
    p.add_argument("--rounds", type=int, default=None, help="rounds per run (default: the chosen demo's)")
    p.add_argument("--local-steps", type=int, default=None, help="local steps per round (default: the chosen demo's)")
    p.add_argument("--target-acc", type=float, default=0.75, help="accuracy whose time and bytes to reach are reported")
    p.add_argument("--target-ppl", type=float, default=None,
                   help="causal-lm: mean personal perplexity whose time and bytes to reach are reported")
    p.add_argument("--out", default=None, help="results directory (default: results/accuracy, or "
                                                "results/suites/<suite> with --suite)")


def run_accuracy(args: argparse.Namespace, **overrides) -> tuple[list[dict], str]:
    """Run every strategy in ``args.strategies``; write JSON, markdown and the PNG; return (rows, markdown).

    ``overrides``: further :class:`SimConfig` fields for every run (tests: a tiny model in-process)."""
    from flexsfl.core.errors import ConfigError
    from flexsfl.sim.config import DEMO, DEMO_LM
    from flexsfl.sim.results import plot
    from flexsfl.sim.simulate import simulate

    if getattr(args, "suite", None):
        from flexsfl.benchmarks.suites import run_suite

        return run_suite(args, **overrides)
    strategies = args.strategies or ",".join(RUNS)
    names = [n.strip() for n in strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown or not names:
        raise ConfigError(f"--strategies {strategies!r}: unknown {', '.join(unknown) or '(empty)'}; choose from "
                          f"{', '.join(RUNS)}")
    out = pathlib.Path(args.out or "results/accuracy")
    out.mkdir(parents=True, exist_ok=True)
    demo = DEMO_LM if getattr(args, "task", "seq_cls") == "causal-lm" else DEMO
    given = {"model": getattr(args, "model", None), "rounds": args.rounds, "local_steps": args.local_steps,
             "target_ppl": getattr(args, "target_ppl", None)}
    base = dataclasses.replace(demo, target_acc=args.target_acc, eval_every=1,
                               **{k: v for k, v in given.items() if v is not None}, **overrides)
    rows, runs = [], []
    for name in names:
        cfg = dataclasses.replace(base, out=str(out / name), **RUNS[name])
        t0 = time.perf_counter()
        summary = simulate(cfg)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
        rows.append(row(name, summary))
        runs.append((name, out / name))
        (out / "accuracy.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(runs, out / "accuracy_vs_time.png")
    md = _markdown(rows)
    (out / "accuracy.md").write_text(md)
    return rows, md


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    _, md = run_accuracy(p.parse_args(argv))
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
