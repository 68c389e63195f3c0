import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidit.data import CaptionedShapes
from minidit.text import (
    PAD,
    START,
    CaptionEncoder,
    TextEncoder,
    TextEncoderLayer,
    Tokenizer,
    caption_set,
    course_vocabulary,
)


def test_shapes_caption_set_is_the_whole_grammar():
    caps = caption_set("shapes")
    # one object: 3 shapes × 6 colours × 2 sizes × 3 positions; two: (3·6·2) left × (3·5·2) right (distinct colours)
    assert len(caps) == 108 + 36 * 30 == len(set(caps))
    ds = CaptionedShapes(n=300, seed=3)
    assert {ds[i]["caption"] for i in range(300)} <= set(caps)
    assert caption_set("mnist")[7] == "a handwritten seven"
    with pytest.raises(ValueError, match="unknown caption set"):
        caption_set("cifar")


def test_tokenizer_pads_masks_and_round_trips():
    tok = Tokenizer()
    caps = ["a small red circle on the left and a large blue square on the right", "a handwritten seven", ""]
    ids, mask = tok.encode(caps)
    assert ids.shape == mask.shape == (3, 16) and ids.dtype == torch.long and mask.dtype == torch.bool
    assert mask.sum(1).tolist() == [16, 4, 1]  # <start> + words; the empty caption keeps <start>
    assert (ids[~mask] == tok.index[PAD]).all() and (ids[:, 0] == tok.index[START]).all()
    assert tok.decode(ids) == caps
    assert tok.tokens("a handwritten seven") == [START, "a", "handwritten", "seven"]


def test_vocabulary_is_closed_and_deterministic():
    v = course_vocabulary()
    assert v[:2] == [PAD, START] and v == course_vocabulary() and len(v) == len(set(v))
    tok = Tokenizer()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        tok.encode(["a small orange circle in the center"])
    with pytest.raises(ValueError, match="max_len"):
        Tokenizer(max_len=4).encode(["a small red circle in the center"])
    with pytest.raises(ValueError, match="list of captions"):
        tok.encode("a handwritten seven")


def test_text_encoder_layer_matches_torch_transformer_encoder_layer():
    """Pre-LN layer with tanh-GELU = nn.TransformerEncoderLayer(norm_first=True) with the same weights and mask."""
    D, H = 16, 4
    ours = TextEncoderLayer(D, H)
    ref = nn.TransformerEncoderLayer(D, H, dim_feedforward=4 * D, dropout=0.0, batch_first=True, norm_first=True,
                                     activation=lambda x: F.gelu(x, approximate="tanh"))
    with torch.no_grad():
        ref.self_attn.in_proj_weight.copy_(ours.attn.qkv.weight)
        ref.self_attn.in_proj_bias.copy_(ours.attn.qkv.bias)
        ref.self_attn.out_proj.weight.copy_(ours.attn.proj.weight)
        ref.self_attn.out_proj.bias.copy_(ours.attn.proj.bias)
        for a, b in ((ref.linear1, ours.mlp.fc1), (ref.linear2, ours.mlp.fc2)):
            a.weight.copy_(b.weight)
            a.bias.copy_(b.bias)
        for a, b in ((ref.norm1, ours.norm1), (ref.norm2, ours.norm2)):
            a.weight.copy_(torch.randn_like(a.weight))
            b.weight.copy_(a.weight)
    ref.eval()
    x = torch.randn(2, 6, D)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3])
    want = ref(x, src_key_padding_mask=~mask)
    got = ours(x, mask)
    assert torch.allclose(got[mask], want[mask], atol=1e-5)  # (torch's fast path zeroes padded rows; we don't care)


def test_text_encoder_ignores_padding_and_pools_real_tokens():
    tok = Tokenizer()
    enc = TextEncoder(tok.vocab_size, dim=32, depth=2, num_heads=4).eval()
    ids, mask = tok.encode(["a large green triangle in the center", "a handwritten two"])
    states, pooled = enc(ids, mask)
    assert states.shape == (2, 16, 32) and pooled.shape == (2, 32)
    ids2 = ids.clone()
    ids2[~mask] = torch.randint(2, tok.vocab_size, (int((~mask).sum()),))  # real words where the padding was
    states2, pooled2 = enc(ids2, mask)
    assert torch.allclose(states2[mask], states[mask], atol=1e-6) and torch.allclose(pooled2, pooled, atol=1e-6)
    for b in range(2):
        assert torch.allclose(pooled[b], states[b, mask[b]].mean(0), atol=1e-6)
    ids3 = ids.clone()
    ids3[0, 3] = tok.index["purple"]  # one real word changes every real state (attention mixes them)
    states3, _ = enc(ids3, mask)
    assert not torch.allclose(states3[0, 1], states[0, 1], atol=1e-4)


def test_text_encoder_validates_inputs():
    enc = TextEncoder(10, dim=8, depth=1, num_heads=2, max_len=4)
    with pytest.raises(ValueError, match="int64"):
        enc(torch.zeros(1, 5, dtype=torch.long), torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask must be bool"):
        enc(torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3))


# ---- the caption encoder: the text conditioner of text-to-image ------------------------------------------------
def test_caption_encoder_ids_and_the_null_caption():
    caps = caption_set("mnist")
    enc = CaptionEncoder(caps, dim=16, depth=1, num_heads=2)
    assert enc.null_label == 10 and enc.ids(["a handwritten seven", "", caps[0]]).tolist() == [7, 10, 0]
    tok = Tokenizer()
    ids, mask = enc.caption_tokens, enc.caption_mask  # (11, 16): one row per caption, the null caption last
    assert torch.equal(ids, tok.encode([*caps, ""])[0]) and torch.equal(mask, tok.encode([*caps, ""])[1])
    assert mask[enc.null_label].sum() == 1 and ids[enc.null_label, 0] == tok.index[START]  # only <start>
    assert set(enc.state_dict()) == {f"encoder.{k}" for k in enc.encoder.state_dict()}  # ids are rebuilt, not saved
    with pytest.raises(ValueError, match="caption set"):
        enc.ids(["a small red circle in the center"])  # a real caption, but not of this set
    with pytest.raises(ValueError, match="list of captions"):
        enc.ids("a handwritten seven")


def test_caption_encoder_is_the_text_encoder_on_the_tokenized_captions():
    caps = caption_set("shapes")
    enc = CaptionEncoder(caps, dim=16, depth=2, num_heads=4).eval()
    picked = [caps[3], caps[-1], ""]
    y = enc.ids(picked)
    tokens, pooled, mask = enc(y)
    ids, want_mask = Tokenizer().encode(picked)
    want_tokens, want_pooled = enc.encoder(ids, want_mask)
    assert torch.equal(mask, want_mask) and mask.sum(1).tolist() == [len(caps[3].split()) + 1, 16, 1]
    assert torch.allclose(tokens, want_tokens, atol=1e-6) and torch.allclose(pooled, want_pooled, atol=1e-6)
    assert torch.allclose(pooled[2], tokens[2, 0], atol=1e-6)  # the null caption pools its single <start> state
