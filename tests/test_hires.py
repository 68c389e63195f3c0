"""High resolution (lesson 13): compositional scenes at any resolution, their per-object / per-relation checker,
cross-resolution attention, the hourglass, the cascade's super-resolution stage, and their FLOPs."""

import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minidit.checkpoint import save_model
from minidit.data import COLOURS, SHAPES, to_model_range
from minidit.faithfulness import classify_pixels
from minidit.metrics import frechet_distance
from minidit.models import DiT
from minidit.text import PAD, START, caption_set, course_vocabulary
from minidit.train import TrainConfig, Trainer
from minidit.variants import load_variant
from minidit.variants.attention import VariantDiT
from minidit.variants.hires import (
    CrossResolutionAttention,
    HiresConfig,
    HiresT2I,
    Hourglass,
    SuperRes,
    SuperResTrainer,
    cross_resolution_attention,
    hires_flops,
    merge_tokens,
    split_tokens,
    upsample,
)
from minidit.variants.scenes import (
    COUNTS,
    RELATIONS,
    SCENE_SIZES,
    Scene,
    blobs,
    check_scene,
    render_scene,
    sample_scene,
    scene_captions,
    scene_faithfulness,
    scene_features,
    scene_requests,
    scene_vocabulary,
    scenes_tensors,
)

FLIP = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


def scenes(n: int, seed: int = 0) -> list[Scene]:
    return [sample_scene(np.random.default_rng([seed, i])) for i in range(n)]


def images(sc: list[Scene], size: int) -> torch.Tensor:
    return torch.stack([to_model_range(render_scene(s, size)).permute(2, 0, 1) for s in sc])


# ---- the scenes grammar, layout and renderer -----------------------------------------------------------------
def test_grammar_is_closed_and_the_old_vocabulary_is_unchanged():
    reqs = scene_requests()
    caps = scene_captions()
    n_obj = len(SHAPES) * len(COLOURS) * len(SCENE_SIZES)
    assert len(reqs) == len(set(caps)) == len(COUNTS) * n_obj + n_obj * (n_obj - len(SCENE_SIZES) * len(SHAPES)) * 4
    assert caps == [r.caption for r in reqs] and caps[0] == "two small red circles"
    assert "a small red circle left of a large blue square" in caps
    assert all(r.objects[0][1] != r.objects[1][1] for r in reqs if r.relation)  # relation objects differ in colour
    # the shipped text models' vocabulary: every word of the shapes and MNIST captions, nothing of the scenes
    old = {w for name in ("shapes", "mnist") for c in caption_set(name) for w in c.split()}
    assert course_vocabulary() == [PAD, START, *sorted(old)]
    scenes_words = scene_vocabulary()
    assert {"left", "of", "above", "three", "circles"} <= set(scenes_words) and "handwritten" not in scenes_words


def test_layout_is_deterministic_respects_the_relation_and_never_overlaps():
    a, b = scenes(300), scenes(300)
    assert a == b and a != scenes(300, seed=1)
    counts = [s for s in a if s.relation is None]
    assert 0.15 < len(counts) / len(a) < 0.35 and {len(s.objects) for s in counts} == set(COUNTS.values())
    for s in a:
        r = [SCENE_SIZES[z] for _, _, z in s.objects]
        xy = np.array(s.centres)
        assert ((xy - np.array(r)[:, None] >= 0) & (xy + np.array(r)[:, None] <= 1)).all()  # inside the canvas
        for i in range(len(r)):
            for j in range(i):
                assert np.abs(xy[i] - xy[j]).max() > r[i] + r[j]  # bounding boxes apart
        if s.relation:
            axis, sign = RELATIONS[s.relation]
            assert sign * (xy[0, axis] - xy[1, axis]) > 0.1


def test_renderer_is_anti_aliased_and_the_same_scene_at_every_resolution():
    s = scenes(1, seed=3)[0]
    x32, x64, x128 = (torch.from_numpy(render_scene(s, n)).float() for n in (32, 64, 128))
    assert len(x64.unique()) > 2 + len(s.objects)  # edge pixels blend the colour with black
    for big, small in ((x128, x64), (x64, x32)):  # area-downsampling a render ≈ rendering smaller
        pooled = torch.nn.functional.avg_pool2d(big.permute(2, 0, 1)[None], 2)[0].permute(1, 2, 0)
        assert (pooled - small).abs().mean() < 2.0
    (_, colour, _), (x, y) = s.objects[0], s.centres[0]
    assert tuple(x128[int(y * 128), int(x * 128)].tolist()) == COLOURS[colour]


# ---- the checker ------------------------------------------------------------------------------------------------
def test_blobs_are_8_connected_and_small_specks_are_ignored():
    m = torch.zeros(20, 20, dtype=torch.bool)
    m[2:6, 2:6] = m[6:10, 6:10] = True  # touching at a corner: one blob
    m[12:18, 12:18] = True
    m[0, 19] = True  # a speck (< 1 % of the image)
    found = blobs(m)
    assert [int(b.sum()) for b in found] == [36, 32]


@pytest.mark.parametrize("size", [64, 128])
def test_checker_is_perfect_on_real_renders(size):
    sc = scenes(60, seed=5)
    assert scene_faithfulness(images(sc, size), sc) == {k: 1.0 for k in ("colour", "shape", "size", "relation",
                                                                         "count", "all")}


def test_checker_at_32_pixels_is_nearly_perfect():
    sc = scenes(100, seed=6)
    assert scene_faithfulness(images(sc, 32), sc)["all"] >= 0.97


def _edit(s: Scene, what: str) -> Scene:
    (shape, colour, size), *rest = s.objects
    if what == "shape":
        shape = SHAPES[(SHAPES.index(shape) + 1) % len(SHAPES)]
    if what == "size":
        size = "large" if size == "small" else "small"
    if what == "colour":
        colour = next(c for c in COLOURS if c not in {o[1] for o in s.objects})
    objects = ((shape, colour, size), *(rest if s.relation else [(shape, colour, size)] * len(rest)))
    if what == "relation":
        return replace(s, relation=FLIP[s.relation])
    if what == "count":
        objects = objects[:2] if len(objects) == 3 else objects * 2
        objects = objects[:3]
    return replace(s, objects=objects)


@pytest.mark.parametrize(("what", "still_pass"), [("shape", {"colour", "size"}), ("size", {"colour", "shape"}),
                                                  ("colour", set()), ("relation", {"colour", "shape", "size"}),
                                                  ("count", {"colour", "shape", "size"})])
def test_checker_catches_each_wrong_request(what, still_pass):
    sc = [s for s in scenes(120, seed=7) if (s.relation is None) == (what == "count")][:25]
    got = scene_faithfulness(images(sc, 64), [_edit(s, what) for s in sc])
    assert got[what] == 0.0 and got["all"] == 0.0
    assert all(got[k] == 1.0 for k in still_pass), got


def test_blank_and_noise_images_fail():
    sc = scenes(10, seed=8)
    for x in (torch.full((10, 3, 64, 64), -1.0), torch.rand(10, 3, 64, 64, generator=torch.Generator().manual_seed(0))
              * 2 - 1):
        got = scene_faithfulness(x, sc)
        assert got["all"] == 0.0 and got["colour"] == 0.0


def test_scene_features_floor_and_sensitivity():
    a, b = scenes(200, seed=9), scenes(200, seed=10)
    fa, fb = scene_features(images(a, 64)), scene_features(images(b, 64))
    assert fa.shape == (200, 8 * 16) and torch.allclose(fa[0].view(8, 16).sum(0), torch.ones(16, dtype=fa.dtype))
    floor = frechet_distance(fa, fb)
    real = images(b, 64)
    blurred = torch.nn.functional.avg_pool2d(real, 7, 1, 3, count_include_pad=False)  # soft edges: "unclear" pixels
    assert frechet_distance(fa, scene_features(blurred)) > 1.5 * floor  # measured: 2.1× at these seeds
    assert frechet_distance(fa, scene_features(real[:, [1, 2, 0]])) > 1.8 * floor  # wrong colours: 2.3×
    assert frechet_distance(fa, scene_features(real.flip(-1))) < 1.2 * floor  # mirrored scenes are scenes too: 1.0×
    assert classify_pixels(images(a[:1], 64)).shape == (1, 64, 64)


def test_check_scene_reports_none_for_the_other_kind():
    count, rel = next(s for s in scenes(50) if s.relation is None), next(s for s in scenes(50) if s.relation)
    r1 = check_scene(classify_pixels(images([count], 64))[0], count)
    r2 = check_scene(classify_pixels(images([rel], 64))[0], rel)
    assert r1["relation"] is None and r1["count"] is True and r2["count"] is None and r2["relation"] is True


# ---- cross-resolution attention ------------------------------------------------------------------------------
def test_cross_resolution_attention_against_a_per_query_reference():
    g = torch.Generator().manual_seed(0)
    B, H, h, w, win, d, Tc = 2, 2, 4, 6, 2, 8, 5
    q, k, v = torch.randn(3, B, H, h * w, d, generator=g, dtype=torch.float64).unbind(0)
    kc, vc = torch.randn(2, B, H, Tc, d, generator=g, dtype=torch.float64).unbind(0)
    out = cross_resolution_attention(q, k, v, kc, vc, (h, w), win)
    ref = torch.empty_like(out)
    for i in range(h * w):
        r, c = divmod(i, w)
        tile = [j for j in range(h * w) if divmod(j, w)[0] // win == r // win and divmod(j, w)[1] // win == c // win]
        keys, vals = torch.cat([k[:, :, tile], kc], 2), torch.cat([v[:, :, tile], vc], 2)  # (B, H, win² + Tc, d)
        wts = (q[:, :, i : i + 1] @ keys.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
        ref[:, :, i] = (wts @ vals)[:, :, 0]
    assert torch.allclose(out, ref, atol=1e-10)
    k2 = k.clone()
    k2[:, :, w - 1] += 5.0  # a key in the top-right tile: queries elsewhere do not see it
    out2 = cross_resolution_attention(q, k2, v, kc, vc, (h, w), win)
    assert torch.equal(out2[:, :, 0], out[:, :, 0]) and not torch.allclose(out2[:, :, w - 1], out[:, :, w - 1])
    kc2 = kc.clone()
    kc2[:, :, 0] += 5.0  # a coarse key: every query sees it
    assert ((cross_resolution_attention(q, k, v, kc2, vc, (h, w), win) - out).abs().amax(dim=(0, 1, 3)) > 0).all()


def test_cross_resolution_module_and_token_merging():
    torch.manual_seed(0)
    m = CrossResolutionAttention(16, 2, (4, 4), 2, coarse_dim=24)
    x, coarse = torch.randn(3, 16, 16), torch.randn(3, 4, 24)
    assert m(x, coarse).shape == (3, 16, 16)
    ramp = torch.arange(16.0).view(1, 16, 1)  # token index on a 4×4 grid
    merged = merge_tokens(ramp, 4)  # (1, 4, 4): each coarse token holds its 2×2 fine tokens, row-major
    assert merged[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    y = torch.randn(2, 64, 5)
    assert torch.equal(split_tokens(merge_tokens(y, 8), 8), y)


# ---- the models -------------------------------------------------------------------------------------------------
SMALL = dict(input_size=32, dim=32, depth=1, num_heads=2, fine_dim=16, text_dim=16, text_depth=1, text_heads=2,
             global_tokens=4)


@pytest.mark.parametrize("arch", ["dit", "window", "hourglass"])
def test_text_to_image_models_start_silent_and_learn(arch):
    torch.manual_seed(0)
    model = HiresT2I(HiresConfig(arch=arch, **SMALL))
    assert isinstance(model.backbone, {"dit": DiT, "window": VariantDiT, "hourglass": Hourglass}[arch])
    x, ids, _ = scenes_tensors(16, seed=0, size=32)
    assert model(x[:4], torch.rand(4), ids[:4]).abs().max() == 0  # adaLN-Zero everywhere, and zero final layers
    trainer = Trainer(model, x, ids, TrainConfig(steps=3, batch_size=8, lr=1e-3, seed=0)).run(progress=False)
    assert math.isfinite(trainer.history[-1]["loss"]) and trainer.model(x[:4], torch.rand(4), ids[:4]).abs().max() > 0
    with pytest.raises(ValueError, match="caption ids"):
        model(x[:2], torch.rand(2), torch.tensor([0, len(scene_captions()) + 1]))


def test_config_validation():
    with pytest.raises(ValueError, match="HiresConfig"):
        HiresConfig(arch="unet")
    with pytest.raises(ValueError, match="HiresConfig"):
        HiresConfig(input_size=64, patch_size=4, window=3)


def test_super_resolution_trainer_is_reproducible_and_checkpoints(tmp_path):
    torch.manual_seed(0)
    cfg = HiresConfig(arch="sr", input_size=32, low_size=16, dim=32, depth=1, num_heads=2, global_tokens=4)
    x, _, _ = scenes_tensors(16, seed=1, size=32)
    tc = TrainConfig(steps=2, batch_size=8, lr=1e-3, seed=3)
    a, b = SuperResTrainer(SuperRes(cfg), x, tc), SuperResTrainer(SuperRes(cfg), x, tc, max_aug=0.2)
    ba, bb = a.host_batch(1), b.host_batch(1)
    assert torch.equal(ba["aug_noise"], bb["aug_noise"]) and torch.allclose(ba["aug"] * 0.2, bb["aug"] * 0.5)
    assert 0 <= float(ba["aug"].min()) and float(ba["aug"].max()) <= 0.5
    a.run(progress=False)
    save_model(tmp_path / "sr.safetensors", a.ema, half=True)
    back = load_variant(tmp_path / "sr.safetensors")
    low = torch.nn.functional.avg_pool2d(x[:3], 2)
    out = upsample(back, low, steps=2, seed=4)
    assert out.shape == (3, 3, 32, 32) and torch.equal(out, upsample(back, low, steps=2, seed=4))
    assert out.abs().max() <= 1


@pytest.mark.parametrize("arch", ["dit", "window", "hourglass", "sr"])
def test_flops_match_a_flop_counter(arch):
    c = HiresConfig(arch=arch, **{**SMALL, "depth": 2, "fine_depth": 2})
    model = SuperRes(c) if arch == "sr" else HiresT2I(c)
    x, t = torch.randn(1, 3, 32, 32), torch.rand(1)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        model(x, t, torch.randn(1, 3, 16, 16), torch.rand(1)) if arch == "sr" else model(x, t, torch.tensor([3]))
    assert hires_flops(c) == counter.get_total_flops()


def test_the_study_configs_meet_the_flop_target():
    dit = hires_flops(HiresConfig(arch="dit"))
    assert hires_flops(HiresConfig(arch="hourglass")) <= 0.5 * dit
    cascade = hires_flops(HiresConfig(arch="dit", input_size=32)) + hires_flops(HiresConfig(arch="sr", dim=64,
                                                                                            depth=2))
    assert cascade <= 0.5 * dit
