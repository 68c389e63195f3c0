"""The two experiments behind lessons 08 and 12: benchmarks/conditioning_ablation.py and benchmarks/scaling.py.

Smoke runs (a few steps, N = 20) check that each mode writes the rows and fields the lessons read; the figures
themselves come from the full runs committed under benchmarks/results/, whose settings are checked against the
scripts here (the settings the scripts hard-code are the ones the committed validation run chose).
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from minidit.models import DiT
from minidit.variants.cost import dit_flops


# ---- conditioning ablation -------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ablation_smoke_rows_curves_and_gates(tmp_path, load_benchmark):
    abl = load_benchmark("conditioning_ablation")
    out = tmp_path / "abl.json"
    abl.main(["--quick", "--steps", "2", "--n", "20", "--threads", "1", "--seeds", "0",
              "--variants", "adaln,adaln-gated,adaln-zero", "--json", str(out)])
    res = json.loads(out.read_text())
    assert res["mode"] == "quick" and (res["split"], res["reference"]) == ("train", "test")
    assert [r["variant"] for r in res["rows"]] == ["adaln", "adaln-gated", "adaln-zero"]
    for r in res["rows"]:
        assert {"conditional_accuracy", "fid", "fid_floor", "fid_ratio", "params", "flops", "lr", "step"} <= set(r)
        assert r["step"] == 2 and r["n"] == 20 and r["train_flops"] == 3 * r["flops"] * 32 * 2
    rows = {r["variant"]: r for r in res["rows"]}
    assert rows["adaln"]["gates_at_init"] is None  # no gates
    assert rows["adaln-zero"]["gates_at_init"] == [0.0, 0.0]  # the "Zero": every gate starts at 0
    # same block, ordinary init: the gates are not zero, but small, because c = t_emb + y_emb starts small
    assert all(0 < g < 0.1 for g in rows["adaln-gated"]["gates_at_init"])
    assert rows["adaln-zero"]["params"] == rows["adaln-gated"]["params"] > rows["adaln"]["params"]
    assert {c["step"] for c in res["curves"]} == {2}  # eval steps beyond the run are dropped, its last step kept
    assert len(res["summary"]) == 3 and res["dit_ranking"] == ["adaln-zero", "adaln"]
    assert set(res["separated_every_seed"]) == {f"{a} < {b}" for a in rows for b in rows if a != b}


@pytest.mark.slow
def test_ablation_tune_smoke_chooses_on_validation(tmp_path, load_benchmark):
    abl = load_benchmark("conditioning_ablation")
    out = tmp_path / "tune.json"
    abl.main(["--tune", "--steps", "2", "--n", "20", "--threads", "1", "--lrs", "1e-3,2e-3",
              "--variants", "adaln-zero", "--json", str(out)])
    res = json.loads(out.read_text())
    assert (res["split"], res["reference"], res["mode"]) == ("fit", "val", "tune")
    assert len(res["rows"]) == 2 * len(abl.SHIFT_GRID)  # every lr × every shift
    best = min(res["rows"], key=lambda r: r["fid"])
    assert res["best_lr"] == {"adaln-zero": best["lr"]}
    assert res["best_shift"] in abl.SHIFT_GRID


def test_ablation_helpers(load_benchmark):
    abl = load_benchmark("conditioning_ablation")
    rows = [{"variant": "a", "fid": 1.0, "conditional_accuracy": 0.9}, {"variant": "a", "fid": 2.0,
                                                                          "conditional_accuracy": 0.8},
            {"variant": "b", "fid": 3.0, "conditional_accuracy": 0.85}]
    assert abl.separated(rows, "a", "b") and not abl.separated(rows, "b", "a")
    assert not abl.separated(rows, "a", "b", "conditional_accuracy")  # 0.8 < 0.85: the seeds overlap
    s = abl.spread([1.0, 2.0, 3.0])
    assert s == {"mean": 2.0, "std": 1.0, "min": 1.0, "max": 3.0}
    assert abl.DIT_TABLE_4["adaln-zero"]["fid"] == 19.47 and abl.DIT_TABLE_4["in-context"]["fid"] == 35.24


# ---- scaling ---------------------------------------------------------------------------------------------------
def test_scaling_grid_changes_flops_at_constant_parameters(load_benchmark):
    """The grid's premise (DiT Figure 6, bottom): a smaller patch multiplies FLOPs, not parameters."""
    sc = load_benchmark("scaling")
    by_model = {}
    for w, L, p in sc.GRID:
        with torch.device("meta"):
            params = DiT(sc.config_of(w, L, p)).num_params()
        by_model.setdefault((w, L), []).append((p, params, dit_flops(sc.config_of(w, L, p))))
    for rows in by_model.values():
        rows.sort(reverse=True)  # patch 7, 4, 2
        for (_, n1, f1), (_, n2, f2) in zip(rows, rows[1:]):
            assert abs(n2 / n1 - 1) < 0.03 and f2 / f1 > 2.5
    assert len(sc.GRID) >= 8 and len({sc.name_of(*s) for s in sc.GRID}) == len(sc.GRID)


def test_scaling_uses_the_ablation_choice(load_benchmark):
    sc, abl = load_benchmark("scaling"), load_benchmark("conditioning_ablation")
    assert sc.LR == abl.LR["adaln-zero"] and sc.SHIFT == abl.SHIFT and sc.SAMPLE["shift"] == abl.SHIFT
    assert (abl.MODEL["dim"], abl.MODEL["depth"], abl.MODEL["patch_size"]) in sc.GRID  # the flagship


def test_scaling_pearson_matches_numpy(load_benchmark):
    sc = load_benchmark("scaling")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    assert math.isclose(sc.pearson(list(x), list(y)), np.corrcoef(x, y)[0, 1], rel_tol=1e-9)


@pytest.mark.slow
def test_scaling_smoke_rows_summary_and_timing(tmp_path, load_benchmark):
    sc = load_benchmark("scaling")
    out = tmp_path / "scaling.json"
    sc.main(["--quick", "--steps", "2", "--n", "20", "--threads", "1", "--configs", "w64-L2/7,w64-L2/4,w128-L2/7",
             "--json", str(out)])
    res = json.loads(out.read_text())
    assert {s["config"] for s in res["summary"]} == {"w64-L2/7", "w64-L2/4", "w128-L2/7"}
    for r in res["rows"]:
        assert r["train_flops"] == 3 * r["flops"] * 32 * r["step"]
        assert {"conditional_accuracy", "fid", "fid_floor", "params", "tokens"} <= set(r)
    assert set(res["correlation"]) == {"log_fid_vs_log_flops", "log_fid_vs_log_params"}
    timing = {t["config"]: t for t in res["timing"]}
    assert set(timing) == {"w64-L2/7", "w64-L2/4", "w128-L2/7"}
    for t in timing.values():  # the fitted predictions reproduce the stored ratios
        assert t["seconds"] > 0 and math.isclose(t["ratio_flops_only"], t["seconds"] / t["predicted_flops_only"],
                                                 rel_tol=0.01)
    assert res["timing_fit"]["rate_gflops_per_s"] > 0
