"""The scaling benchmarks' own logic: gpu_check's CPU side (no CUDA here: clean exit, argument checks, MFU
arithmetic, the timing code run on the CPU) and smoke runs of throughput, cost_model, memory_time,
attention_variants and attention_kernels in a further-shrunk --quick mode (the figures come from full runs in
benchmarks/results/)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from minidit import pipeline
from minidit.models import get_config
from minidit.variants.attention import VariantConfig, VariantDiT
from minidit.variants.cost import train_flops_per_image
from minidit.variants.speed import use_fast_attention


# ---- gpu_check ------------------------------------------------------------------------------------------------
def test_gpu_check_without_cuda_says_so_and_does_nothing(tmp_path, monkeypatch, capsys, load_benchmark):
    gc = load_benchmark("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    called = []
    monkeypatch.setattr(gc, "run_device_tests", lambda *a, **k: called.append(a))
    out = tmp_path / "g.json"
    assert gc.main(["--json", str(out)]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert json.loads(out.read_text())["skipped"] is True and not called


def test_gpu_check_arguments(load_benchmark):
    gc = load_benchmark("gpu_check")
    a = gc.parse_args([])
    assert (a.config, a.batch, a.steps, a.warmup, a.no_compile) == ("DiT-S/2", 256, 50, 5, False)
    q = gc.parse_args(["--quick", "--compile-mode", "max-autotune"])
    assert (q.steps, q.warmup, q.compile_mode, a.compile_mode) == (20, 3, "max-autotune", "default")
    for bad in (["--batch", "0"], ["--steps", "0"], ["--config", "DiT-Q/3"], ["--compile-mode", "fast"]):
        with pytest.raises(SystemExit):
            gc.parse_args(bad)


def test_gpu_check_mfu_arithmetic(load_benchmark):
    gc = load_benchmark("gpu_check")
    flops = train_flops_per_image(get_config("DiT-S/2"))
    assert flops == pytest.approx(3 * 12.111e9, rel=1e-3)
    s = gc.throughput_summary(batch=256, steps=10, seconds=0.5, flops_per_image=flops, peak_flops=800e12)
    assert s["images_per_s"] == 5120.0 and s["step_ms"] == 50.0
    assert s["mfu"] == pytest.approx(5120 * flops / 800e12, abs=1e-4)
    assert s["model_tflops_per_s"] == pytest.approx(5120 * flops / 1e12, abs=0.01)
    with pytest.raises(ValueError):
        gc.throughput_summary(1, 1, 0.0, flops, 1e12)


def test_gpu_check_timing_code_runs_on_cpu(tmp_path, load_benchmark):
    """The throughput part (package Trainer step and bare step) on the CPU with a tiny model, no compile."""
    gc = load_benchmark("gpu_check")
    out = tmp_path / "g.json"
    code = gc.main(["--device", "cpu", "--skip-tests", "--config", "mnist-tiny", "--batch", "8", "--steps", "2",
                    "--warmup", "1", "--no-compile", "--quick", "--sdpa", "math", "--json", str(out)])
    assert gc.bare_step_seconds(gc.get_config("DiT-S/2", depth=1), 2, 1, 1, torch.device("cpu"),
                                compile=False) > 0  # the real config's shapes go through the flow loss
    res = json.loads(out.read_text())
    assert code == 0
    for run in ("package", "bare"):
        assert res["throughput"][run]["images_per_s"] > 0 and 0 < res["throughput"][run]["mfu"] < 2
    assert res["throughput"]["tokens"] == 49 and res["bf16_matmul_peak_tflops"] > 0
    assert res["throughput"]["sdpa"] == "math" and res["throughput"]["datasheet_bf16_tflops"] is None
    assert res["throughput"]["compile_mode"] is None and res["machine"]["device"] == "cpu"


# ---- smoke runs (tiny configs patched in) -------------------------------------------------------------------------
def test_throughput_smoke_writes_ratios_and_mfu(tmp_path, monkeypatch, capsys, load_benchmark):
    tp = load_benchmark("throughput")
    monkeypatch.setattr(tp, "course_configs", lambda quick: [("flagship", get_config("mnist-tiny"), 4)])
    peaks = iter([{"float32": 1e11, "bfloat16": 2e11}, {"float32": 2e11, "bfloat16": 4e11}])  # before, after
    monkeypatch.setattr(tp, "measure_peaks", lambda seconds: next(peaks))
    out = tmp_path / "t.json"
    assert tp.main(["--quick", "--rounds", "2", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    summary = capsys.readouterr().out.split("matmul peak (best of before/after)")[1]
    for r in res["rows"]:  # the closing summary prints what the JSON holds (MFU against the better peak)
        if r["config"] == "flagship" and r["model"] == "DiT" and r["impl"] != "diffusers":
            assert f"flagship {r['impl']} {r['dtype']}: {r['images_per_s']:.1f} img/s = " \
                   f"{100 * r['mfu_vs_fp32_peak']:.1f}% of the fp32 matmul peak" in summary
    impls = {(r["model"], r["impl"], r["dtype"]) for r in res["rows"]}
    for dtype in ("fp32", "bf16"):
        assert {("DiT", "minidit", dtype), ("DiT", "diffusers", dtype), ("MMDiT", "minidit", dtype),
                ("MMDiT", "diffusers", dtype), ("DiT", "Trainer.train_step", dtype)} <= impls
    ratios = res["ratios_vs_diffusers"]
    assert len(ratios) == 4 and all(r["speedup_vs_diffusers"] > 0 for r in ratios)
    assert all(r["paired_range"][0] <= r["paired_median_speedup"] <= r["paired_range"][1] for r in ratios)
    step = [r for r in res["rows"] if r["impl"] == "Trainer.train_step"]
    assert len(step) == 2 and all(r["seconds_vs_fwd_bwd_same_rounds"] > 0 for r in step)
    r = res["rows"][0]
    # against the better (after) fp32 peak; the JSON rounds MFU to 4 decimals
    assert r["mfu_vs_fp32_peak"] == pytest.approx(r["images_per_s"] * r["train_gflops_per_image"] * 1e9 / 2e11,
                                                  rel=1e-3, abs=6e-5)
    assert res["flagship_best"]["impl"] in ("minidit", "Trainer.train_step")


def test_throughput_thread_scaling_measures_each_thread_count_against_its_own_peak(monkeypatch, load_benchmark):
    tp = load_benchmark("throughput")
    monkeypatch.setattr(tp, "matmul_peak", lambda dtype, seconds: 1e10 * torch.get_num_threads())
    before = torch.get_num_threads()
    c = get_config("mnist-tiny")
    try:
        res = tp.thread_scaling(c, 4, 2, rounds=2, peak_s=0.01)
        assert torch.get_num_threads() == 2  # left at the run's thread count
    finally:
        torch.set_num_threads(before)
    assert res["peak_speedup"] == 2.0 and res["step_speedup"] > 0
    for n, peak in (("1", 1e10), ("2", 2e10)):
        r = res[n]
        assert r["fp32_peak_gflops"] == peak / 1e9
        assert r["mfu_vs_this_thread_count_peak"] == pytest.approx(
            4 / r["seconds_per_step"] * train_flops_per_image(c) / peak, rel=1e-2)


def test_cost_model_smoke(tmp_path, monkeypatch, load_benchmark):
    cm = load_benchmark("cost_model")
    tiny = [("T=16", get_config("mnist-tiny", input_size=16), 4), ("T=64", get_config("mnist-tiny", input_size=32), 2)]
    monkeypatch.setattr(cm, "check_configs", lambda quick: tiny)
    out = tmp_path / "c.json"
    assert cm.main(["--quick", "--threads", "1", "--json", str(out), "--plot", str(tmp_path / "c.png")]) == 0
    res = json.loads(out.read_text())
    assert len(res["model_table"]) == len(cm.RESOLUTIONS) * len(cm.SPACES)
    for r in res["measured"]:
        assert 0.7 < r["peak_ratio"] < 1.3 and 0.8 < r["activation_ratio"] < 1.2
    assert (tmp_path / "c.png").stat().st_size > 0


def test_memory_time_smoke(tmp_path, monkeypatch, load_benchmark):
    mt = load_benchmark("memory_time")
    monkeypatch.setattr(mt, "bench_configs", lambda quick: [("tiny", get_config("mnist-tiny"), 8)])
    out = tmp_path / "m.json"
    assert mt.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["settings"]
    assert [r["setting"] for r in rows] == list(mt.SETTINGS)
    peak = {r["setting"]: r["peak_step_mb"] for r in rows}
    assert peak["fp32+ckpt"] < peak["fp32"] and peak["bf16"] < peak["fp32"]


def test_attention_variants_keep_their_maths_on_the_fast_path(load_benchmark):
    """The benchmark trains every variant on the CPU fast path: same outputs as without it (ALiBi keeps its bias,
    tiles take the unfused kernel). fp32 on an 8×8 grid (64 keys: unfused) and a 14×14 grid (7×7 tiles: unfused)."""
    av = load_benchmark("attention_variants")
    y = torch.tensor([1, 10])
    for side in (16, 28):
        x, t = torch.randn(2, 1, side, side), torch.rand(2)
        for name, attn in av.VARIANTS.items():
            c = VariantConfig(input_size=side, patch_size=2, dim=32, depth=1, num_heads=4,
                              **av.with_window(attn, side // 2))
            model = VariantDiT(c)
            for p in model.parameters():  # non-zero weights everywhere, so attention reaches the output
                p.data.normal_(0, 0.2)
            with torch.no_grad():
                plain = model(x, t, y)
                fast = use_fast_attention(model)(x, t, y)
            assert torch.allclose(fast, plain, atol=1e-5), (side, name)


@pytest.mark.slow
def test_attention_variants_smoke(tmp_path, monkeypatch, load_benchmark):
    av = load_benchmark("attention_variants")
    monkeypatch.setattr(av, "SPEED_MODEL", dict(patch_size=2, dim=32, depth=1, num_heads=4))
    monkeypatch.setattr(av, "QUALITY_MODEL", dict(patch_size=2, dim=32, depth=1, num_heads=4))
    out = tmp_path / "a.json"
    assert av.main(["--quick", "--steps", "2", "--n", "10", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert [r["variant"] for r in res["speed"]] == list(av.VARIANTS) == [r["variant"] for r in res["quality"]]
    flops = {r["variant"]: r["forward_gflops_per_image"] for r in res["speed"]}
    assert flops["window7"] < flops["mha"] and flops["gqa-1kv"] < flops["mha"] == flops["rope-2d"]


def test_attention_kernels_smoke(tmp_path, load_benchmark):
    ak = load_benchmark("attention_kernels")
    out = tmp_path / "k.json"
    assert ak.main(["--quick", "--threads", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["dtype"], r["tokens"]) for r in rows] == [("fp32", 16), ("fp32", 256), ("bf16", 16), ("bf16", 256)]
    assert [r["minidit_runs"] for r in rows] == ["unfused", "sdpa", "unfused", "unfused"]  # the fast path's rule
    for r in rows:  # the unfused path keeps the T×T weights for backward, SDPA does not
        assert set(r["ms"]) == {"sdpa", "unfused", "minidit"} and r["peak_mb"]["unfused"] > r["peak_mb"]["sdpa"]


# ---- time_to_quality ------------------------------------------------------------------------------------------
def test_time_to_quality_rows_count_the_vae_encoding(tmp_path, monkeypatch, load_benchmark):
    ttq = load_benchmark("time_to_quality")
    lat = pipeline.RECIPES["latent"]  # the demo's recipe, shrunk to a 2-second run
    small = replace(lat, model=replace(lat.model, dim=32, depth=1, num_heads=2), sample=dict(lat.sample, steps=2))
    monkeypatch.setitem(pipeline.RECIPES, "latent", small)
    out = tmp_path / "ttq.json"
    assert ttq.main(["--budget", "2", "--every", "1", "--n", "20", "--threads", "1", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["recipe"] == "latent" and res["vae"] == "vae_mnist_f4c4" and res["vae_encode_seconds"] > 0
    rows = res["rows"]
    assert len(rows) == 2 and rows[0]["steps"] < rows[1]["steps"]
    for r in rows:
        assert {"seconds", "steps", "conditional_accuracy", "fid", "fid_floor", "goal_met"} <= set(r)
        assert r["seconds"] >= res["vae_encode_seconds"]  # the clock includes encoding the training set
        assert r["goal_met"] == (r["conditional_accuracy"] >= 0.95 and r["fid"] <= 2 * r["fid_floor"])
        assert r["guide_step"] is not None and r["guide_step"] < r["steps"]  # autoguidance by an earlier EMA
    ablation = res["final_without_autoguidance"]  # the final model with CFG alone, same noise
    assert [a["guide_scale"] for a in ablation] == [1.0] * 3 and ablation[0]["cfg_scale"] == small.sample["cfg_scale"]
