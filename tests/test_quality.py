"""Image quality of edits: the Fréchet distance (torchmetrics) against a hand computation, the
confident share, and both in the effects table and at matched strength."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch

from hmine.effects import measure_effects
from hmine.quality import (
    ClassifierFeatures,
    FrechetDistance,
    PassThrough,
    confident_share,
    frechet_distance,
)
from hmine.strength import matched_strength


def _hand_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """FID's formula with numpy/scipy: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 sqrtm(S_a S_b)), covariances ddof=1."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(s_a @ s_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * root))


def test_frechet_distance_matches_a_hand_computation_on_gaussian_features():
    rng = np.random.default_rng(0)
    d = 5
    mixing = rng.normal(size=(d, d))
    a = rng.normal(size=(300, d)) @ mixing
    b = rng.normal(size=(200, d)) @ (mixing * 1.5) + np.arange(d)  # other covariance, shifted mean
    expected = _hand_frechet(a, b)
    assert expected > 1.0
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)
    # Gaussians with known parameters: N(0, I) vs N(m, 4 I) is |m|^2 + d (1 + 4 - 2*2) = |m|^2 + d
    x = rng.normal(size=(20000, 3))
    y = 2 * rng.normal(size=(20000, 3)) + np.array([1.0, 0.0, 2.0])
    assert frechet_distance(x, y) == pytest.approx(5.0 + 3.0, rel=0.05)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)


def test_one_reference_serves_many_distances_and_bad_features_are_refused():
    rng = np.random.default_rng(1)
    a, b, c = (rng.normal(size=(50, 4)) + shift for shift in (0.0, 1.0, 3.0))
    metric = FrechetDistance(PassThrough(4), batch_size=7)  # several updates per set
    metric.set_reference(torch.from_numpy(a))
    assert metric.distance(torch.from_numpy(b)) == pytest.approx(_hand_frechet(a, b), rel=1e-9)
    assert metric.distance(torch.from_numpy(c)) == pytest.approx(_hand_frechet(a, c), rel=1e-9)
    assert np.isnan(metric.distance(torch.from_numpy(c[:1])))
    with pytest.raises(ValueError, match=r"expected features \(n, 4\)"):
        metric.distance(torch.zeros(3, 5))
    with pytest.raises(ValueError, match="at least 2 reference images"):
        metric.set_reference(torch.zeros(1, 4))


@pytest.fixture(scope="module")
def world_images():
    from hmine import world

    return world.generate(48, seed=5).images


@pytest.fixture(scope="module")
def labeller():
    from hmine.labelling import WorldLabeller

    return WorldLabeller()


def test_classifier_features_are_the_penultimate_layer_the_heads_read(labeller, world_images):
    extractor = ClassifierFeatures(labeller.model)
    images = torch.from_numpy(world_images[:6])
    features = extractor(images)
    assert features.shape == (6, labeller.model.hidden) and features.dtype == torch.float64
    # the colour head applied to these features gives the classifier's own colour logits
    logits = labeller.model.color_head(features.float())
    np.testing.assert_allclose(logits.detach().numpy(), labeller.model(images)["color_logits"].detach().numpy(), atol=1e-5)
    # the image metric is the feature metric of these features
    noisy = np.clip(world_images + 0.3 * np.random.default_rng(2).normal(size=world_images.shape), -1, 1).astype(np.float32)
    metric = FrechetDistance(extractor)
    metric.set_reference(world_images)
    by_images = metric.distance(noisy)
    by_features = frechet_distance(extractor(torch.from_numpy(world_images)), extractor(torch.from_numpy(noisy)))
    assert by_images == pytest.approx(by_features, rel=1e-6)
    assert by_images > 10 * metric.distance(world_images[::-1].copy()) + 1e-3


def test_confident_share_needs_every_class_head_confident():
    scores = pd.DataFrame({
        "p_circle": [0.95, 0.95, 0.5, 0.92], "p_square": [0.03, 0.03, 0.4, 0.04], "p_triangle": [0.02, 0.02, 0.1, 0.04],
        "p_red": [0.91, 0.6, 0.99, 0.02], "p_green": [0.05, 0.3, 0.0, 0.97], "p_blue": [0.04, 0.1, 0.01, 0.01],
    })  # fmt: skip
    # 1: circle 0.95, red 0.91; 2: colour only 0.6; 3: shape only 0.5; 4: circle 0.92, green 0.97
    assert confident_share(scores) == pytest.approx(0.5)
    assert confident_share(scores, level=0.92) == pytest.approx(0.25)  # row 1's red 0.91 falls short
    assert np.isnan(confident_share(pd.DataFrame({"brightness": [0.1, 0.2]})))


def test_the_effects_table_carries_quality_per_direction_and_scale(labeller, world_images):
    rng = np.random.default_rng(3)
    noise = rng.normal(size=world_images.shape).astype(np.float32)
    scales = [0.0, 1.0, 2.0]
    images = np.stack([np.clip(world_images + s * 0.35 * noise, -1, 1) for s in scales])[None]  # (1, scale, sample, ...)
    effects = measure_effects({"images": images}, ["noise/is_red"], scales, labeller, {"is_red": 0.5})
    per_scale = effects.groupby("scale")[["confident_share", "frechet_distance"]]
    assert (per_scale.nunique() == 1).all().all()  # one value per (direction, scale), on every attribute's row
    quality = per_scale.first()
    # identical sets: 0 up to the rounding of eigenvalues of singular covariances (48 images, 128 features)
    assert quality.loc[0.0, "frechet_distance"] == pytest.approx(0.0, abs=1e-3)
    assert quality.loc[0.0, "confident_share"] == pytest.approx(confident_share(labeller.score(world_images)))
    assert quality.loc[0.0, "frechet_distance"] < quality.loc[1.0, "frechet_distance"] < quality.loc[2.0, "frechet_distance"]
    assert quality.loc[2.0, "confident_share"] < quality.loc[0.0, "confident_share"]


def test_matched_strength_reads_the_quality_at_the_matched_scale():
    # one direction, own attribute a, other b; at +10 60 % flip, at +20 100 %: matched at 17.5
    rows = []
    for scale, rate, confident, distance in [(0.0, 0.0, 0.95, 0.0), (10.0, 0.6, 0.85, 2.0), (20.0, 1.0, 0.45, 10.0)]:
        for attribute in ("a", "b"):
            rows.append({"direction": "probe/a", "scale": scale, "attribute": attribute,
                         "flip_to_positive": rate if attribute == "a" else 0.0, "flip_to_negative": np.nan,
                         "changed_decision": 0.1 * scale / 20, "mean_change_std": 0.0,
                         "confident_share": confident, "frechet_distance": distance})  # fmt: skip
    table = matched_strength(pd.DataFrame(rows))
    row = table.loc[("probe/a", "+")]
    assert row["scale"] == pytest.approx(17.5)
    assert row["confident_share"] == pytest.approx(0.85 + 0.75 * (0.45 - 0.85))
    assert row["frechet_distance"] == pytest.approx(2.0 + 0.75 * 8.0)
    # a table from before the quality columns: NaN, not an error
    old = pd.DataFrame(rows).drop(columns=["confident_share", "frechet_distance"])
    assert np.isnan(matched_strength(old).loc[("probe/a", "+"), "frechet_distance"])


def test_a_clip_labeller_measures_quality_in_its_image_embeddings(tiny_clip_dir):
    from conftest import TINY_CLIP_IMAGE_SIZE

    from hmine.clip import ClipLabeller
    from hmine.clip.labeller import _projected
    from hmine.quality import ClipImageFeatures, QualityMeter, feature_extractor

    labeller = ClipLabeller({"smiling": ("a smiling face", "a face")}, model_id=str(tiny_clip_dir), batch_size=3)
    extractor = feature_extractor(labeller)
    assert isinstance(extractor, ClipImageFeatures)
    images = np.random.default_rng(4).uniform(-1, 1, size=(6, 3, TINY_CLIP_IMAGE_SIZE, TINY_CLIP_IMAGE_SIZE)).astype(np.float32)
    with torch.no_grad():
        expected = _projected(labeller.model.get_image_features(pixel_values=labeller.preprocess(images))).double()
    features = extractor(torch.from_numpy(images))
    np.testing.assert_allclose(features.numpy(), expected.numpy(), rtol=1e-6, atol=1e-6)
    meter = QualityMeter(labeller)
    meter.reference(images)
    shifted = np.clip(images[::-1] * 0.2, -1, 1).copy()
    measured = meter.measure(shifted, labeller.score(shifted))
    assert np.isnan(measured["confident_share"])  # CLIP pairs are no class heads
    assert measured["frechet_distance"] == pytest.approx(frechet_distance(expected, extractor(torch.from_numpy(shifted))), rel=1e-6)


def test_a_reference_of_fewer_than_two_images_replaces_the_old_one_with_none():
    """The next set's distance is NaN, not a distance to the previous set's reference (other samples)."""
    from hmine import world
    from hmine.labelling import WorldLabeller
    from hmine.quality import QualityMeter

    labeller = WorldLabeller()
    images = world.generate(6, seed=3).images
    meter = QualityMeter(labeller)
    meter.reference(images[:4])
    assert np.isfinite(meter.measure(images[2:], labeller.score(images[2:]))["frechet_distance"])
    meter.reference(images[4:5])
    assert np.isnan(meter.measure(images[4:], labeller.score(images[4:]))["frechet_distance"])
    meter.reference(images[:4])  # a usable reference again
    assert np.isfinite(meter.measure(images[2:], labeller.score(images[2:]))["frechet_distance"])
