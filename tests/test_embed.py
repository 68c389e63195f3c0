import math

import torch

from minidit.embed import LabelEmbedder, MlpEmbedder, TimestepEmbedder, timestep_embedding
from minidit.guidance import drop_labels


def test_timestep_embedding_closed_form():
    t = torch.tensor([0.0, 0.25, 1.0])
    e = timestep_embedding(t * 1000, 256)
    assert e.shape == (3, 256)
    for b, tv in enumerate(t.tolist()):
        for k in (0, 1, 37, 127):
            f = math.exp(-math.log(10000) * k / 128)
            assert math.isclose(e[b, k], math.cos(1000 * tv * f), abs_tol=1e-4)
            assert math.isclose(e[b, 128 + k], math.sin(1000 * tv * f), abs_tol=1e-4)


def test_timestep_embedder_scales_t_by_1000_and_uses_256_frequencies():
    emb = TimestepEmbedder(32)
    assert isinstance(emb, MlpEmbedder) and emb.mlp[0].in_features == 256
    t = torch.tensor([0.3, 0.9])
    want = emb.mlp(timestep_embedding(t * 1000, 256))
    assert torch.allclose(emb(t), want)
    # a small change of t in [0, 1] must move the features (it would not if t were not scaled)
    a, b = timestep_embedding(torch.tensor([0.501]) * 1000), timestep_embedding(torch.tensor([0.5]) * 1000)
    assert (a - b).abs().max() > 0.1


def test_mlp_embedder_is_linear_silu_linear_with_dits_init():
    emb = MlpEmbedder(5, 16)
    for p in emb.parameters():
        p.data.fill_(3.0)
    emb.init_weights()
    lin1, lin2 = emb.mlp[0], emb.mlp[2]
    assert torch.equal(lin1.bias, torch.zeros(16)) and torch.equal(lin2.bias, torch.zeros(16))
    big = MlpEmbedder(256, 512)
    big.init_weights()
    assert abs(big.mlp[0].weight.std().item() - 0.02) < 1e-3  # N(0, 0.02²)
    x = torch.randn(3, 5)
    with torch.no_grad():
        lin1.weight.normal_(), lin2.weight.normal_()
    want = torch.nn.functional.silu(x @ lin1.weight.T) @ lin2.weight.T
    assert torch.allclose(emb(x), want, atol=1e-5)
    assert emb(x.double()).dtype == torch.float32  # inputs are cast to the weights' dtype


def test_null_label_is_row_num_classes_and_embedding_is_a_plain_lookup():
    le = LabelEmbedder(10, 8)
    assert le.num_classes == 10 and le.embedding_table.num_embeddings == 11
    le.init_weights()
    assert abs(le.embedding_table.weight.std().item() - 0.02) < 0.01
    y = torch.arange(11).repeat(3)
    for training in (True, False):  # no dropout inside: training mode changes nothing
        assert torch.equal(le.train(training)(y), le.embedding_table.weight[y])


def test_drop_labels_replaces_exactly_the_masked_labels_with_the_null_label():
    y = torch.arange(10).repeat(5)
    mask = torch.zeros(50, dtype=torch.bool)
    mask[[0, 7, 49]] = True
    out = drop_labels(y, mask, null_label=10)
    assert out.dtype == y.dtype and out.shape == y.shape
    assert out[mask].tolist() == [10, 10, 10] and torch.equal(out[~mask], y[~mask])
    assert torch.equal(y, torch.arange(10).repeat(5))  # the input is not modified
    assert torch.equal(drop_labels(y, torch.zeros(50, dtype=torch.bool), 10), y)
    assert (drop_labels(y, torch.ones(50, dtype=torch.bool), 10) == 10).all()
