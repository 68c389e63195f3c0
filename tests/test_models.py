import pytest
import torch

from minidit.models import CONFIGS, DiT, DiTConfig, get_config

PAPER_PARAMS = {"DiT-S/2": 33.0e6, "DiT-B/2": 130.5e6, "DiT-L/2": 458.1e6, "DiT-XL/2": 675.1e6}


@pytest.mark.parametrize("name,want", PAPER_PARAMS.items())
def test_dit_parameter_counts_match_the_paper(name, want):
    with torch.device("meta"):
        model = DiT(get_config(name))
    n = model.num_params()
    assert abs(n - want) / want < 0.01, f"{name}: {n:,} vs {want:,.0f}"
    cfg = model.config
    assert (cfg.input_size, cfg.in_channels, cfg.patch_size, cfg.num_classes, cfg.learn_sigma) == (32, 4, 2, 1000, True)


def test_fresh_dit_outputs_exactly_zero():
    model = DiT(get_config("mnist-tiny"))
    out = model(torch.randn(4, 1, 28, 28), torch.rand(4), torch.tensor([0, 3, 9, 10]))
    assert out.shape == (4, 1, 28, 28) and torch.equal(out, torch.zeros_like(out))


def test_learned_sigma_doubles_output_channels():
    cfg = DiTConfig(input_size=8, in_channels=4, patch_size=2, dim=16, depth=1, num_heads=2, learn_sigma=True)
    assert DiT(cfg)(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).shape == (2, 8, 8, 8)


@pytest.mark.parametrize("name", ["mnist-tiny", "mnist-s4", "mnist-s2"])
def test_course_configs_run(name):
    model = DiT(get_config(name, depth=1))
    with torch.no_grad():
        for p in model.final_layer.parameters():
            p.normal_()
    x = torch.randn(2, 1, 28, 28)
    out = model(x, torch.rand(2), torch.tensor([1, 2]))
    assert out.shape == x.shape and out.abs().sum() > 0


def test_samples_do_not_interact():
    model = DiT(get_config("mnist-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.eval()
    x, t, y = torch.randn(3, 1, 28, 28), torch.rand(3), torch.tensor([1, 2, 3])
    out = model(x, t, y)
    x2 = x.clone()
    x2[0] = torch.randn(1, 28, 28)
    out2 = model(x2, t, y)
    assert torch.allclose(out[1:], out2[1:], atol=1e-6) and not torch.allclose(out[0], out2[0])


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DiT(get_config("mnist-tiny"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    x, t, y = torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 2])
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.grad_checkpointing = ckpt
        model(x, t, y).pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(*grads))


@pytest.mark.parametrize("kwargs,match", [
    (dict(patch_size=3), "patch_size"),
    (dict(num_heads=5), "num_heads"),
    (dict(dim=30), "dim"),
    (dict(class_dropout=1.0), "class_dropout"),
    (dict(depth=0), "depth"),
])
def test_bad_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DiTConfig(**kwargs)


def test_unknown_config_name_and_fields():
    with pytest.raises(ValueError, match="unknown config"):
        get_config("DiT-XXL/2")
    with pytest.raises(ValueError, match="unknown DiTConfig field"):
        DiTConfig.from_dict({"dim": 8, "width": 3})
    assert "mnist-s4" in CONFIGS


@pytest.mark.parametrize("x,t,y,match", [
    (torch.randn(2, 3, 28, 28), torch.rand(2), torch.tensor([1, 2]), r"x must be \(B, 1, 28, 28\)"),
    (torch.randn(2, 1, 32, 32), torch.rand(2), torch.tensor([1, 2]), "x must be"),
    (torch.randint(0, 5, (2, 1, 28, 28)), torch.rand(2), torch.tensor([1, 2]), "floating-point"),
    (torch.randn(2, 1, 28, 28), torch.rand(3), torch.tensor([1, 2]), r"t must be a tensor of shape \(2,\)"),
    (torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1]), "y must be"),
    (torch.randn(2, 1, 28, 28), torch.rand(2), torch.tensor([1, 11]), r"labels must be in \[0, 10\]"),
])
def test_bad_model_inputs(x, t, y, match):
    with pytest.raises(ValueError, match=match):
        DiT(get_config("mnist-tiny"))(x, t, y)
