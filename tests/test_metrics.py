import pytest
import torch

from minidit import metrics
from minidit.checkpoint import read_meta, weights_path
from minidit.data import mnist_tensors


def test_shipped_classifier_is_small_and_accurate():
    path = weights_path("mnist_classifier")
    assert path.stat().st_size < 1_000_000
    meta = read_meta(path)
    acc = metrics.accuracy(metrics.load_classifier(), *mnist_tensors("test"))
    assert acc >= 0.98
    assert acc == pytest.approx(meta["held_out_accuracy"], abs=2e-3)  # the recorded figure is the measured one


def _gaussian_features(n, d, mean, std, seed):
    """Features whose sample mean and covariance are exactly `mean` and diag(std²)."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    z = z - z.mean(0)
    # whiten exactly: sample covariance becomes the identity
    cov = torch.cov(z.T)
    ev, U = torch.linalg.eigh(cov)
    z = z @ U @ torch.diag(ev.rsqrt()) @ U.T
    return z * std + mean


def test_frechet_distance_closed_form():
    d = 5
    m1, m2 = torch.zeros(d, dtype=torch.float64), torch.arange(d, dtype=torch.float64) / 4
    s1, s2 = torch.linspace(0.5, 2, d, dtype=torch.float64), torch.linspace(1, 3, d, dtype=torch.float64)
    f1, f2 = _gaussian_features(500, d, m1, s1, 0), _gaussian_features(700, d, m2, s2, 1)
    want = float(((m1 - m2) ** 2).sum() + ((s1 - s2) ** 2).sum())  # diagonal covariances
    assert metrics.frechet_distance(f1, f2) == pytest.approx(want, rel=1e-6)
    assert metrics.frechet_distance(f1, f1) == pytest.approx(0, abs=1e-6)
    with pytest.raises(ValueError, match="feature sets"):
        metrics.frechet_distance(f1, f2[:, :3])


def test_kid_and_precision_recall():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(600, 8, generator=g), torch.randn(600, 8, generator=g)
    assert abs(metrics.kid(a, b)) < 0.05
    assert metrics.kid(a, b + 1.0) > 0.5
    p, r = metrics.precision_recall(a, b)
    assert p > 0.8 and r > 0.8
    collapsed = a[:1].repeat(600, 1) + 0.01 * torch.randn(600, 8, generator=g)
    p, r = metrics.precision_recall(a, collapsed)
    assert p > 0.9 and r < 0.1  # realistic but not diverse


def test_real_digits_score_like_the_floor():
    x, y = metrics.stratified_real(1000, seed=1)
    m = metrics.evaluate(x, y)
    assert m["conditional_accuracy"] > 0.98
    assert m["fid"] < 2 * m["fid_floor"] and m["fid_floor"] > 0
    assert m["precision"] > 0.6 and m["recall"] > 0.6
    noise = torch.rand(1000, 1, 28, 28) * 2 - 1
    bad = metrics.evaluate(noise, y)
    assert bad["fid"] > 50 * m["fid_floor"] and bad["conditional_accuracy"] < 0.3


def test_wrong_labels_lower_conditional_accuracy():
    x, y = metrics.stratified_real(200)
    assert metrics.evaluate(x, (y + 1) % 10)["conditional_accuracy"] < 0.05


@pytest.mark.parametrize("images,match", [
    (torch.zeros(4, 3, 28, 28), r"\(N, 1, 28, 28\)"),
    (torch.full((4, 1, 28, 28), float("nan")), "NaN"),
])
def test_bad_images(images, match):
    with pytest.raises(ValueError, match=match):
        metrics.evaluate(images, torch.zeros(4, dtype=torch.long))


def test_stratified_real_is_balanced_and_draws_from_its_split():
    x, y = metrics.stratified_real(1000)
    assert torch.bincount(y).tolist() == [100] * 10
    assert torch.bincount(metrics.stratified_real(25)[1]).tolist() == [3] * 5 + [2] * 5
    with pytest.raises(ValueError, match="between 10 and 4000"):
        metrics.stratified_real(5000)
    with pytest.raises(ValueError, match="between 10 and 3500"):
        metrics.stratified_real(4000, split="fit")
    fit = {r.numpy().tobytes() for r in mnist_tensors("fit")[0]}
    assert all(r.numpy().tobytes() in fit for r in metrics.stratified_real(200, split="fit")[0])


def test_validation_reference_for_choosing_settings():
    """reference="val": features of the 500 validation digits, a floor from the "fit" digits; never the test set."""
    ref = metrics.reference_features("val")
    assert ref.shape == (500, metrics.FEATURE_DIM)
    assert torch.equal(ref, metrics.features(mnist_tensors("val")[0]))
    assert metrics.reference_features("test").shape == (1000, metrics.FEATURE_DIM)
    real, _ = metrics.stratified_real(300, seed=2, split="fit")
    floor = metrics.fid_floor(300, seed=2, reference="val")
    assert floor == pytest.approx(metrics.frechet_distance(metrics.features(real), ref), rel=1e-9)
    assert floor != metrics.fid_floor(300, seed=2, reference="test")
    x, y = metrics.stratified_real(300, seed=5, split="fit")
    m = metrics.evaluate(x, y, reference="val")
    assert m["fid_floor"] == metrics.fid_floor(300, reference="val")
    assert m["fid"] == pytest.approx(metrics.frechet_distance(metrics.features(x), ref), rel=1e-9)
    assert m["conditional_accuracy"] > 0.97 and m["fid"] < 2 * m["fid_floor"]
    with pytest.raises(ValueError, match="reference must be 'test' .* or 'val'"):
        metrics.evaluate(x, y, reference="train")


def test_random_affine_is_set_by_its_draws():
    x = mnist_tensors("test")[0][:4]
    u = torch.full((4, 4), 0.5)  # middle of every range: no rotation, scale 1, no shift
    assert torch.allclose(metrics.random_affine(x, u), x, atol=1e-5)
    shift = u.clone()
    shift[:, 2] = (4 / 28 / 0.2 + 1) / 2  # x shift of 4/28 grid units ([−1, 1] spans 28 px): content moves 2 px left
    moved = metrics.random_affine(x, shift)
    assert torch.allclose(moved[..., :-2], x[..., 2:], atol=1e-4)
    assert torch.allclose(moved[..., -2:], torch.full_like(moved[..., -2:], -1.0), atol=1e-4)  # background fills in
    g = torch.Generator().manual_seed(0)
    u = torch.rand(4, 4, generator=g)
    assert torch.equal(metrics.random_affine(x, u), metrics.random_affine(x, u.clone()))  # no hidden randomness
