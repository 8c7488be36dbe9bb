"""``flexsfl data info|prepare``: inspect a data set, split it among clients into per-client files (no torch)."""

from __future__ import annotations

import argparse
import os

import numpy as np

from flexsfl.sim.data.dataset import Dataset
from flexsfl.sim.data.partition import SCHEMES, Partition
from flexsfl.sim.data.prepare import prepare
from flexsfl.sim.data.sources import load_dataset

__all__ = ["add_parser", "run"]


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``flexsfl data {prepare,info}``; dispatch parsed arguments to :func:`run`."""
    p = subparsers.add_parser("data", help="inspect data sets and split them among clients")
    sub = p.add_subparsers(dest="data_command", required=True, metavar="{prepare,info}")

    def dataset_args(q: argparse.ArgumentParser) -> None:
        q.add_argument("--dataset", required=True, help="vader, rotten, or a CSV/JSONL file (text,label[,group])")
        q.add_argument("--label-names", help="comma-separated class names, if the file's labels are strings")
        q.add_argument("--cache", help="download cache (default: $FLEXSFL_CACHE or ~/.cache/flexsfl)")

    prep = sub.add_parser("prepare", help="partition a data set into per-client train/test JSONL files")
    dataset_args(prep)
    prep.add_argument("--partition", required=True, choices=SCHEMES, help="how to split among clients")
    prep.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (smaller = more label skew)")
    prep.add_argument("--clients", type=int, required=True, help="number of clients K")
    prep.add_argument("--out", required=True, help="output directory")
    prep.add_argument("--seed", type=int, default=0)
    prep.add_argument("--test-fraction", type=float, default=0.2, help="share of each client's data held out")
    prep.add_argument("--max-train", type=int, help="cap on train examples per client")
    prep.add_argument("--max-test", type=int, help="cap on test examples per client")
    prep.add_argument("--overwrite", action="store_true", help="replace a previously prepared --out")

    info = sub.add_parser("info", help="counts per group and label")
    dataset_args(info)
    info.add_argument("--groups", type=int, default=20, help="show at most this many groups (largest first)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Run a parsed ``flexsfl data`` command; raises :class:`FlexSFLError` on bad input."""
    names = [s.strip() for s in args.label_names.split(",")] if args.label_names else None
    data = load_dataset(args.dataset, cache=args.cache, label_names=names)
    if args.data_command == "info":
        print(_info_table(data, args.groups))
        return 0
    part = prepare(
        data,
        args.partition,
        args.clients,
        args.out,
        args.seed,
        alpha=args.alpha,
        test_fraction=args.test_fraction,
        max_train=args.max_train,
        max_test=args.max_test,
        overwrite=args.overwrite,
    )
    print(_partition_table(part, args.out))
    return 0


def _info_table(data: Dataset, limit: int) -> str:
    names = data.label_names
    head = f"{'group':<24} {'examples':>9} " + " ".join(f"{n[:10]:>10}" for n in names)

    def row(group: str, counts: np.ndarray) -> str:
        return f"{group[:24]:<24} {int(counts.sum()):>9,} " + " ".join(f"{int(x):>10,}" for x in counts)

    by_group = sorted(data.group_label_counts().items(), key=lambda kv: -kv[1].sum())
    lines = [
        f"{data.name}: {len(data.examples):,} examples, {len(names)} labels ({', '.join(names)}), "
        f"{len(by_group) if data.groups is not None else 'no'} groups",
        f"source: {data.source}",
    ]
    if data.notes:
        lines.append("load notes: " + ", ".join(f"{k}={v:,}" for k, v in sorted(data.notes.items())))
    lines += ["", head]
    lines += [row(g, c) for g, c in by_group[:limit]]
    if len(by_group) > limit:
        rest = [int(c.sum()) for _, c in by_group[limit:]]
        lines.append(f"... {len(rest)} more groups ({min(rest)}-{max(rest)} examples each)")
    lines.append(row("total", data.label_counts()))
    return "\n".join(lines)


def _partition_table(part: Partition, out: str | os.PathLike) -> str:
    s = part.stats()
    names = part.label_names
    lines = [
        f"{part.dataset}: {part.scheme} partition"
        + (f" (alpha={part.alpha:g})" if part.alpha is not None else "")
        + f" into {len(part.clients)} clients, seed {part.seed} -> {out}",
        f"{'client':>6} {'train':>7} {'test':>6}  label balance ({', '.join(names)})  groups",
    ]
    for c in s["per_client"]:
        groups = ", ".join(c["groups"]) if "groups" in c and len(c["groups"]) <= 3 else str(c["n_groups"])
        balance = " ".join(f"{x:.2f}" for x in c["label_balance"])
        lines.append(f"{c['client']:>6} {c['train']:>7,} {c['test']:>6,}  {balance:<{16 + len(', '.join(names))}}  {groups}")
    lines.append(
        f"union test {s['union_test']['size']:,}; label skew {s['label_skew']:.3f} (mean TV distance to the overall "
        f"label mix); {s['dropped_duplicates']} train duplicates of test texts dropped"
    )
    return "\n".join(lines)
