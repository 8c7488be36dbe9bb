"""``flexsfl bench top``: the planner's U vs head/tail rows by hand; the measured table on a real top bundle."""

from __future__ import annotations

import argparse

import pytest

from flexsfl.benchmarks.top import _markdown, add_arguments, planner_rows, run_top


def test_planner_rows_bytes_by_hand_and_u_costs_more_per_step():
    rows = planner_rows("minilm", ["rpi4", "jetson-orin"], batch=8, seq=48)
    z = 8 * 48 * 384 * 4
    for r in rows:
        assert (r["head_tail"]["up_bytes"], r["head_tail"]["down_bytes"]) == (z + 8 * 48 + 8 * 8, z)
        assert (r["u"]["up_bytes"], r["u"]["down_bytes"]) == (2 * z + 8 * 48, 2 * z)
        assert r["u"]["network_s"] > r["head_tail"]["network_s"]
    assert rows[0]["head_tail"]["split"] == 1 and (rows[0]["u"]["split"], rows[0]["u"]["top"]) == (1, 1)
    md = _markdown({"measured": [], "planner": rows})
    assert "| rpi4 | 8×48 | 1, " in md and "| jetson-orin |" in md


@pytest.mark.slow
def test_bench_top_measures_a_real_top_bundle(tmp_path, tiny_model_dirs):
    from flexsfl.sim.config import SimConfig
    from flexsfl.sim.simulate import _bundle_for

    cfg = SimConfig(model=str(tiny_model_dirs["llama"]), task="causal_lm", topology="u", splits=(1,), tops=(1,),
                    max_seq=16, batch_size=2, num_labels=2)
    bundle = _bundle_for(cfg, 1, tmp_path / "bundles", top=1)
    p = argparse.ArgumentParser()
    add_arguments(p)
    args = p.parse_args(["--bundle", str(bundle), "--batch", "2", "--seq", "16", "--repeats", "3", "--model", "minilm",
                         "--profiles", "rpi4", "--out", str(tmp_path / "out")])
    results, md = run_top(args)
    (m,) = results["measured"]
    assert (m["split"], m["top"]) == (1, 1) and m["top_ms_p50"] > 0 and m["head_ms_p50"] > 0
    assert m["peak_rss_mb_with_top"] > 0 and m["top_predicted_mb"] > 0
    assert "| 1+1 | ort | 2×16 |" in md and (tmp_path / "out" / "top.json").exists()
