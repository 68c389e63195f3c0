import math

import pytest
import torch

from minidit.embed import LabelEmbedder, TimestepEmbedder, timestep_embedding


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
    assert emb.mlp[0].in_features == 256
    t = torch.tensor([0.3, 0.9])
    want = emb.mlp(timestep_embedding(t * 1000, 256))
    assert torch.allclose(emb(t), want)
    # a small change of t in [0, 1] must move the features (it would not if t were not scaled)
    a, b = timestep_embedding(torch.tensor([0.501]) * 1000), timestep_embedding(torch.tensor([0.5]) * 1000)
    assert (a - b).abs().max() > 0.1


def test_label_dropout_only_in_training_mode():
    le = LabelEmbedder(10, 8, dropout_prob=0.5)
    y = torch.arange(10).repeat(50)
    le.eval()
    assert torch.equal(le(y), le.embedding_table(y))
    le.train()
    out = le(y)
    null = le.embedding_table.weight[10]
    dropped = (out == null).all(1)
    assert 0.35 < dropped.float().mean() < 0.65
    # an explicit mask decides exactly which labels are dropped
    mask = torch.zeros(500, dtype=torch.bool)
    mask[:3] = True
    out = le(y, drop_mask=mask)
    assert (out[:3] == null).all() and not (out[3:] == null).all(1).any()


def test_null_label_is_num_classes():
    le = LabelEmbedder(10, 8)
    assert le.null_label == 10 and le.embedding_table.num_embeddings == 11
    le.eval()
    assert torch.equal(le(torch.tensor([10])), le.embedding_table.weight[10:11])


@pytest.mark.parametrize("labels,match", [
    (torch.tensor([11]), r"labels must be in \[0, 10\]"),
    (torch.tensor([-1]), r"labels must be in"),
    (torch.tensor([1.0]), "integer tensor"),
    (torch.tensor([[1]]), "integer tensor"),
])
def test_bad_labels(labels, match):
    with pytest.raises(ValueError, match=match):
        LabelEmbedder(10, 8)(labels)


def test_bad_t_shape():
    with pytest.raises(ValueError, match="1-D tensor"):
        TimestepEmbedder(8)(torch.tensor(0.5))
