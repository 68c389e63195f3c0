"""Text-to-image wiring, the caption-faithfulness checker and the attention measurements."""

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from minidit.attention_maps import (
    attention_ratio,
    cfg_attention_check,
    image_to_text,
    map_entropy,
    mean_attention_distance,
    object_attention_ratio,
    record_text_maps,
    sample_with_attention,
    token_index,
)
from minidit.checkpoint import load_model, save_model
from minidit.data import CaptionedShapes, ShapeSpec, caption_for, objects_of, render_shapes, to_model_range
from minidit.faithfulness import evaluation_captions, faithfulness, faithfulness_report
from minidit.guidance import guided
from minidit.mmdit import MMDiT
from minidit.models import DiT
from minidit.pipeline import train_t2i
from minidit.sampling import sample
from minidit.t2i import TextToImage, generate, get_t2i_config, heldout_captions, shapes_tensors
from minidit.text import CaptionEncoder, Tokenizer, caption_set
from minidit.train import TrainConfig, Trainer

TWO = "a small red circle on the left and a large blue square on the right"
ONE = "a large green triangle in the center"


def tiny(backbone: str, **kw) -> TextToImage:
    cfg = get_t2i_config(f"shapes-{backbone}", input_size=16, patch_size=4, dim=32, depth=2, num_heads=2,
                         text_dim=16, text_depth=1, text_heads=2, **kw)
    return TextToImage(cfg)


def randomize(model):
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model.eval()


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_forward_shapes_fresh_zero_and_caption_ids(backbone):
    m = tiny(backbone)
    assert isinstance(m.text, CaptionEncoder) and isinstance(m.backbone, DiT if backbone == "dit" else MMDiT)
    bc = m.backbone.config
    assert (bc.context_dim, bc.pooled_dim) == (16, 16)  # text tokens as context, their mean as the pooled vector
    if backbone == "dit":  # every block cross-attends to the caption
        assert all(b.cross_attn is not None for b in m.backbone.blocks)
    y = m.caption_ids([TWO, ONE, ""])
    assert y.tolist()[2] == m.null_label == m.text.null_label == 1188 and caption_set("shapes")[int(y[0])] == TWO
    out = m(torch.randn(3, 3, 16, 16), torch.rand(3), y)
    assert out.shape == (3, 3, 16, 16) and torch.equal(out, torch.zeros_like(out))  # adaLN-Zero + zero final layer
    with pytest.raises(ValueError, match="caption set"):
        m.caption_ids(["a handwritten seven"])
    with pytest.raises(ValueError, match=r"caption ids \(B,\) in \[0, 1188\]"):
        m(torch.randn(1, 3, 16, 16), torch.rand(1), torch.tensor([1189]))
    with pytest.raises(ValueError, match="caption ids"):
        m(torch.randn(1, 3, 16, 16), torch.rand(1), torch.randn(1, 16))  # a pooled vector is not a caption


def test_forward_is_the_caption_encoder_then_the_backbone():
    m = randomize(tiny("dit"))
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), m.caption_ids([TWO, ""])
    tokens, pooled, mask = m.text(y)
    assert torch.equal(m(x, t, y), m.backbone(x, t, pooled, tokens, mask))


def _text_input_errors(net, x, t, pooled, ctx):
    """The messages of a backbone's __call__ (models.check_dit_inputs) for each kind of bad text input."""
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert net(x, t, pooled, ctx, mask).shape == x.shape
    empty = mask.clone()
    empty[1] = False
    cases = {"context width": (pooled, torch.randn(2, 5, 7), None), "context batch": (pooled, ctx[:1], None),
             "pooled": (torch.randn(3, 16), ctx, None), "label instead of pooled": (torch.tensor([1, 2]), ctx, None),
             "no context": (pooled, None, None), "float mask": (pooled, ctx, mask.float()),
             "mask length": (pooled, ctx, mask[:, :4]), "empty row": (pooled, ctx, empty)}
    messages = {}
    for name, args in cases.items():
        with pytest.raises(ValueError) as err:
            net(x, t, *args)
        messages[name] = str(err.value)
    return messages


def test_backbones_check_the_text_inputs_alike():
    """DiT and MMDiT check their text inputs in one place (models.check_dit_inputs): the same errors, word for word."""
    x, t, ctx, pooled = torch.randn(2, 3, 16, 16), torch.rand(2), torch.randn(2, 5, 16), torch.randn(2, 16)
    dit, mmdit = (_text_input_errors(tiny(b).backbone, x, t, pooled, ctx) for b in ("dit", "mmdit"))
    assert dit == mmdit
    for name, match in [("context width", "context must be"), ("context batch", "context must be"),
                        ("pooled", "pooled text vector"), ("label instead of pooled", "pooled text vector"),
                        ("no context", "needs context tokens"), ("float mask", "context_mask must be bool"),
                        ("mask length", "context_mask must be bool"), ("empty row", "at least one True")]:
        assert re.search(match, dit[name]), (name, dit[name])


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_the_caption_reaches_the_output_and_the_model_never_drops_it(backbone):
    m = randomize(tiny(backbone))
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    y = m.caption_ids([TWO, ONE])
    out = m(x, t, y)
    other = m.caption_ids([TWO.replace("red", "purple"), ONE.replace("green", "white")])
    assert not torch.allclose(m(x, t, other), out, atol=1e-4)  # one word changes the prediction
    assert not torch.allclose(m(x, t, torch.full_like(y, m.null_label)), out, atol=1e-4)
    m.train()  # caption dropout is the Trainer's job: the model itself is deterministic in training mode too
    assert torch.equal(m(x, t, y), out)


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_trainer_drops_captions_to_the_null_caption(backbone):
    """The Trainer replaces a label_dropout share of the caption ids by the null caption ("" = only <start>)."""
    m = tiny(backbone)
    images, y = torch.randn(64, 3, 16, 16), torch.randint(0, m.null_label, (64,))
    trainer = Trainer(m, images, y, TrainConfig(batch_size=64, label_dropout=0.3, seed=3))
    seen = []
    m.text.register_forward_hook(lambda mod, args, out: seen.append((args[0], out[2])))  # (ids, text mask)
    b = trainer.batch(0)
    trainer.loss(b)
    (ids, mask), = seen
    drop = b["drop"]
    assert 0 < int(drop.sum()) < 64
    assert torch.equal(ids, torch.where(drop, m.null_label, b["y"]))
    assert (mask[drop].sum(1) == 1).all() and (mask[~drop].sum(1) > 1).all()  # dropped = the single <start> token
    share = torch.cat([trainer.host_batch(s)["drop"] for s in range(40)]).float().mean()
    assert 0.25 < float(share) < 0.35


def test_null_caption_is_a_single_start_token():
    m = tiny("mmdit")
    tok = Tokenizer()
    assert m.text.caption_mask[m.null_label].sum() == 1
    assert m.text.caption_tokens[m.null_label, 0] == tok.index["<start>"]


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_cfg_uses_the_null_caption(backbone):
    m = randomize(tiny(backbone))
    y = m.caption_ids([TWO, ONE])
    x, t = torch.randn(2, 3, 16, 16), torch.rand(2)
    cond, uncond = m(x, t, y), m(x, t, torch.full_like(y, m.null_label))
    assert torch.allclose(guided(m, y, 4.0)(x, t), uncond + 4.0 * (cond - uncond), atol=1e-5)
    imgs = sample(m, y, steps=2, cfg_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 3, 16, 16) and torch.isfinite(imgs).all()
    shown = generate(m, [TWO, ONE], steps=2, cfg_scale=3.0, seed=0)  # the same samples, clamped to [-1, 1]
    assert torch.equal(shown, imgs.clamp(-1, 1))


def test_trainer_trains_and_checkpoints_round_trip(tmp_path):
    cfg = get_t2i_config("shapes-mmdit", input_size=16, patch_size=4, dim=32, depth=2, num_heads=2, text_dim=16,
                         text_depth=1, text_heads=2)
    trainer = train_t2i(cfg, steps=30, batch_size=8, lr=2e-3, n_images=120, progress=False)
    losses = [h["loss"] for h in trainer.history]
    assert losses[-1] < losses[0]
    path = save_model(tmp_path / "t2i.safetensors", trainer.ema, half=True, command="test")
    loaded = load_model(path)
    assert isinstance(loaded, TextToImage) and loaded.config == cfg
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), loaded.caption_ids([TWO, ONE])
    ref = TextToImage(cfg).eval()  # shipped weights are the EMA weights rounded to fp16
    ref.load_state_dict({k: v.half().float() for k, v in trainer.ema.state_dict().items()})
    assert torch.allclose(loaded(x, t, y), ref(x, t, y), atol=1e-6)
    assert next(loaded.parameters()).dtype == torch.float32


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_shipped_checkpoint_loads_is_small_and_made_by_the_package(backbone):
    """The weights notebooks 09-11 load: fp16, a few MB, made by the package's own command."""
    path = Path(__file__).resolve().parents[1] / "minidit" / "weights" / f"shapes_{backbone}.safetensors"
    assert path.stat().st_size < 8_000_000
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["command"].startswith(f"minidit t2i --config shapes-{backbone} ")
    model = load_model(path)
    assert isinstance(model, TextToImage) and model.config == get_t2i_config(f"shapes-{backbone}")
    assert isinstance(model.backbone, DiT if backbone == "dit" else MMDiT) and not model.training
    with safe_open(str(path), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    y = model.caption_ids([TWO, ""])
    out = model(torch.randn(2, 3, 32, 32), torch.full((2,), 0.5), y)
    assert torch.isfinite(out).all() and not torch.allclose(out[0], out[1], atol=1e-3)  # the caption matters


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_shipped_checkpoint_is_faithful(backbone):
    """The shipped models follow seen and held-out captions (the checker below)."""
    model = load_model(Path(__file__).resolve().parents[1] / "minidit" / "weights" / f"shapes_{backbone}.safetensors")
    report = faithfulness_report(model, evaluation_captions(8, 4, seed=11), scales=(3.0,), steps=20)
    assert report["seen"]["cfg_3"]["all"] >= 0.75 and report["heldout"]["cfg_3"]["all"] >= 0.5, report


def test_heldout_captions_are_never_trained_on():
    held = heldout_captions(0.1)
    assert held == heldout_captions(0.1) and len(held) == 108 and all(" and " in c for c in held)
    images, y, objs = shapes_tensors(400, seed=1, exclude=held, size=16)
    caps = caption_set("shapes")
    assert images.shape[1:] == (3, 16, 16) and len(y) == len(objs) < 400
    assert not {caps[i] for i in y.tolist()} & held


# ---- the faithfulness checker -------------------------------------------------------------------------------
def _render(objects):
    img, _ = render_shapes(objects)
    return to_model_range(img).permute(2, 0, 1)


def test_checker_is_perfect_on_ground_truth_and_near_chance_on_wrong_captions():
    ds = CaptionedShapes(n=120, seed=11)
    items = [ds[i] for i in range(120)]
    imgs = torch.stack([it["image"] for it in items])
    objs = [it["objects"] for it in items]
    assert faithfulness(imgs, objs) == {"colour": 1.0, "position": 1.0, "shape": 1.0, "size": 1.0, "all": 1.0}
    noisy = (imgs + 0.2 * torch.randn_like(imgs)).clamp(-1, 1)
    assert faithfulness(noisy, objs)["all"] > 0.97
    perm = list(range(120))
    random.Random(0).shuffle(perm)
    wrong = faithfulness(imgs, [objs[i] for i in perm])
    assert wrong["colour"] < 0.25 and wrong["all"] < 0.05


@pytest.mark.parametrize("change,fails,passes", [
    (dict(colour="yellow"), "colour", ("shape", "size")),  # position is judged on the requested colour's pixels
    (dict(shape="triangle"), "shape", ("colour", "position", "size")),
    (dict(size="small"), "size", ("colour", "position", "shape")),
    (dict(position="left"), "position", ()),
])
def test_checker_catches_each_attribute(change, fails, passes):
    asked = ShapeSpec("square", "red", "large", "center")
    drawn = ShapeSpec(**{**asked.__dict__, **change})
    result = faithfulness(_render([drawn])[None], [[asked]])
    assert result[fails] == 0.0 and result["all"] == 0.0
    assert all(result[a] == 1.0 for a in passes)


def test_checker_two_objects_each_judged_in_its_own_window():
    asked = objects_of(TWO)
    swapped = [ShapeSpec("circle", "blue", "small", "left"), ShapeSpec("square", "red", "large", "right")]
    assert faithfulness(_render(asked)[None], [asked])["all"] == 1.0
    assert faithfulness(_render(swapped)[None], [asked])["colour"] == 0.0


def test_objects_of_inverts_captions():
    caps = caption_set("shapes")
    assert all(caption_for(objects_of(c)) == c for c in caps[::37])
    with pytest.raises(ValueError, match="not a captioned-shapes caption"):
        objects_of("a handwritten seven")


# ---- attention measurements ---------------------------------------------------------------------------------
def test_token_index_points_at_the_words():
    tok = Tokenizer()
    toks = tok.tokens(TWO)
    assert toks[token_index(TWO, 0, "colour")] == "red" and toks[token_index(TWO, 1, "shape")] == "square"
    assert tok.tokens(ONE)[token_index(ONE, 0, "size")] == "large"


def test_ratio_entropy_and_distance_on_known_maps():
    inside = torch.zeros(16)
    inside[[5, 6, 9, 10]] = 1.0
    assert math.isclose(attention_ratio(torch.ones(16), inside), 1.0)
    peaked = torch.where(inside > 0, 3.0, 1.0)
    assert math.isclose(attention_ratio(peaked, inside), 3.0, rel_tol=1e-6)
    assert math.isclose(map_entropy(torch.ones(16)), 1.0, rel_tol=1e-6) and map_entropy(torch.eye(16)[3]) < 1e-6
    w = torch.eye(16)[None]  # each token attends to itself: distance 0
    assert float(mean_attention_distance(w)) == 0.0
    assert float(mean_attention_distance(torch.ones(1, 16, 16))) > 1.0


def test_image_to_text_slices_the_joint_matrix():
    L, T = 3, 4
    w = torch.arange((L + T) ** 2, dtype=torch.float).reshape(1, 1, L + T, L + T)
    block = image_to_text(w, "mmdit", L, renormalize=False)
    assert block.shape == (1, 1, T, L) and block[0, 0, 0, 0] == w[0, 0, L, 0]
    assert block[0, 0, -1, -1] == w[0, 0, -1, L - 1]  # rows [L:] = image queries, columns [:L] = text keys
    norm = image_to_text(w, "mmdit", L)  # renormalised over the words
    assert torch.allclose(norm.sum(-1), torch.ones(1, 1, T))
    assert torch.allclose(norm * block.sum(-1, keepdim=True), block)
    assert image_to_text(torch.ones(1, 1, T, L), "dit", L).shape == (1, 1, T, L)


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_recorded_maps_and_sampling_records(backbone):
    m = randomize(tiny(backbone))
    y = m.caption_ids([TWO, ONE])
    maps = record_text_maps(m, torch.randn(2, 3, 16, 16), torch.rand(2), y)
    assert maps.shape == (2, 2, 2, 16, 16)  # (depth, B, heads, T_img, L)
    n_real = len(Tokenizer().tokens(ONE))  # <start> + 7 words
    assert (maps[:, 1, :, :, n_real:] == 0).all() and (maps[:, 1, :, :, :n_real] > 0).all()  # padding gets nothing
    out = sample_with_attention(m, [TWO, ONE], steps=3, cfg_scale=2.0)
    assert out["text"].shape == (3, 2, 2, 2, 16, 16) and out["self"].shape == (3, 2, 2, 2, 16, 16)
    assert out["x0_pred"].shape == (3, 2, 3, 16, 16) and out["t"][0] == 1.0
    # the recording does not change what is sampled
    imgs = sample(m, y, steps=3, cfg_scale=2.0, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    assert torch.allclose(out["images"], imgs, atol=1e-5)


@pytest.mark.parametrize("backbone", ["dit", "mmdit"])
def test_cfg_does_not_change_attention_weights(backbone):
    m = randomize(tiny(backbone))
    res = cfg_attention_check(m, [TWO, ONE], scales=(1.0, 4.0))
    assert res["4.0"]["max_attention_change"] < 1e-5
    assert res["4.0"]["max_velocity_change"] > 1e-2


def test_object_attention_ratio_reports_every_layer():
    m = randomize(tiny("dit"))
    res = object_attention_ratio(m, n=8, t_values=(0.5,), seed=1)
    assert set(res) == {"colour", "shape"} and set(res["colour"]["ratio"]["per_layer"]) == {0, 1}
    assert res["colour"]["ratio"]["count"] > 0 and res["colour"]["ratio"]["geo_mean"] > 0


def test_checker_rejects_floods_and_blank_images():
    """A uniform grey, blank or one-colour image is not an object (a fresh model outputs 0 = grey)."""
    asked = [[ShapeSpec("square", "white", "large", "center")], [ShapeSpec("circle", "red", "small", "left")]]
    for fill in (0.0, -1.0):
        res = faithfulness(torch.full((2, 3, 32, 32), fill), asked)
        assert res == {"colour": 0.0, "position": 0.0, "shape": 0.0, "size": 0.0, "all": 0.0}
    flood = to_model_range(torch.tensor([220, 40, 40])).view(1, 3, 1, 1).expand(2, 3, 32, 32)  # all red
    res = faithfulness(flood, asked)
    assert res["colour"] == 0.0 and res["all"] == 0.0


def test_attention_overlays():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from minidit.viz import overlay_attention, show_attention_grid, upsample_map

    up = upsample_map(torch.arange(4.0), 8)  # a 2×2 token grid over an 8×8 image
    assert up.shape == (8, 8) and up[0, 0] == 0 and up[0, 7] == 1 and up[7, 0] == 2 and up[7, 7] == 3
    with pytest.raises(ValueError, match="square number"):
        upsample_map(torch.ones(5), 8)
    with pytest.raises(ValueError, match="does not tile"):
        upsample_map(torch.ones(9), 8)
    ax = overlay_attention(torch.zeros(3, 8, 8), torch.rand(4), title="red")
    assert ax.get_title() == "red"
    fig = show_attention_grid(torch.zeros(3, 8, 8), torch.rand(2, 3, 4), row_titles=["a", "b"], col_titles=list("xyz"))
    assert len(fig.axes) == 6
    with pytest.raises(ValueError, match="one image per column"):
        show_attention_grid(torch.zeros(2, 3, 8, 8), torch.rand(2, 3, 4))
    plt.close("all")
