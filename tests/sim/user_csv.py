"""A user's CSV and a small ``flexsfl simulate`` command line over it, for the tests that run one."""

from __future__ import annotations

__all__ = ["ten_class_csv", "simulate_args"]


def ten_class_csv(path, n=120):
    """``text,label`` rows of 10 classes (0–9) and no ``group`` column, written to ``path``."""
    words = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]
    lines = ["text,label"] + [f"item {i} is about {words[i % 10]} {words[(i * 7) % 10]},{i % 10}" for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def simulate_args(tmp_path, model, csv, *extra):
    """``flexsfl simulate`` on ``csv``: 2 in-process clients, 2 rounds of 2 steps, a tiny budget; ``extra`` appended."""
    return ["simulate", "--model", str(model), "--data", str(csv), "--partition", "iid", "--clients", "2",
            "--rounds", "2", "--local-steps", "2", "--batch-size", "4", "--splits", "1", "--profiles", "rpi4,rpi5",
            "--max-train", "40", "--max-test", "20", "--max-seq", "16", "--in-process",
            "--out", str(tmp_path / "run"), *extra]
