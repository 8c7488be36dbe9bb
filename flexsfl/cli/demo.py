"""``flexsfl demo``: the README's demo, 4 devices of different kinds on 4 VADER domains, MiniLM, FlexP-SFL.

The same flags as ``flexsfl simulate`` (:class:`~flexsfl.sim.config.SimConfig`'s fields); a flag
not given keeps :data:`~flexsfl.sim.config.DEMO`'s value. ``--topology u`` runs the demo's
devices U-shaped (FlexP-SFL-U: labels and output layers stay on each device; the planner picks
each device's split and top). ``--task causal-lm`` is the second
demo (:data:`~flexsfl.sim.config.DEMO_LM`): SmolLM2 fine-tuned on each device's own VADER domain
as raw text, a perplexity table, then each client's personalized model merged into one PEFT
adapter (``OUT/personal/cID``) and one text sampled from it.
"""

from __future__ import annotations

import argparse

from flexsfl.cli.config_args import add_config_args, config_from_args
from flexsfl.sim.config import DEMO, DEMO_LM, SimConfig

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    # The simulation exports bundles and hosts the tails: torch, loaded only when it runs.
    from flexsfl.sim.results import table
    from flexsfl.sim.simulate import simulate

    lm = (args.task or "").replace("-", "_") == "causal_lm"
    cfg = config_from_args(SimConfig, args, base=DEMO_LM if lm else DEMO)
    summary = simulate(cfg)
    print(table(summary))
    if cfg.task == "causal_lm":
        _samples(cfg, summary)
    print(f"results: {cfg.out}/summary.json, rounds.jsonl, accuracy_vs_time.png, server/metrics.jsonl")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="the README's demo: 4 devices, 4 VADER domains, MiniLM, FlexP-SFL")
    add_config_args(p, SimConfig, base=DEMO)
    p.set_defaults(func=run)


def _samples(cfg: SimConfig, summary: dict) -> None:
    """Each client's personalized model as one PEFT adapter, and a greedy continuation of one of its own texts."""
    import pathlib

    from flexsfl.cli.generate import generate
    from flexsfl.edge_runtime.data import read_examples
    from flexsfl.sim.adapters import merge_personal
    from flexsfl.sim.simulate import bundle_for

    out = pathlib.Path(cfg.out).resolve()
    for k, c in enumerate(summary["per_client"]):
        cid = c["client"]
        # A split device keeps its personal state; the whole-model baselines' is what the server got last.
        personal = out / "clients" / cid
        if not personal.is_dir():
            personal = out / "server" / "personal" / f"{cid}.safetensors"
        bundle = bundle_for(cfg, c["split"], (c.get("choice") or {}).get("top"))  # a U-shaped client's has its top
        model = merge_personal(bundle, personal, out / "server", out / "personal" / cid, force=True)
        text = read_examples(out / "data" / f"client_{k}" / "test.jsonl")[0].text
        prompt = " ".join(text.split()[:6])
        print(f"{cid} ({c['groups'][0]}, adapter {model}): {prompt!r} -> {generate(str(model), prompt, max_new_tokens=24)!r}")
