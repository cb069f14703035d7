"""The shapes-world classifier: the shipped weights, save/load, augmentation, training."""

import json

import numpy as np
import pytest
import torch

from hmine import world
from hmine.labelling import WorldLabeller, embedded_classifier_path
from hmine.world.classifier import (
    EVALUATION_SEED,
    THRESHOLDED_ATTRIBUTES,
    ClassifierTrainConfig,
    ShapesClassifier,
    augment,
    degrade,
    load_classifier,
    predict_attributes,
    save_classifier,
    train_classifier,
    training_batch,
)
from hmine.world.training import LOG_FILE, latest_checkpoint

# Above every training seed (< 10**9) and distinct from the evaluation/calibration seeds.
FRESH_SEED = 2 * 10**9 + 17
TINY = {"width": 8, "squeeze": 4, "hidden": 16}


@pytest.fixture(scope="module")
def shipped():
    return load_classifier(embedded_classifier_path())


def test_shipped_classifier_scores_fresh_world_images(shipped):
    batch = world.generate(64, seed=FRESH_SEED)
    table = predict_attributes(shipped, batch.images)
    assert len(table) == 64
    assert (table["shape"].to_numpy() == batch.factors["shape"]).mean() >= 0.95
    assert (table["color"].to_numpy() == batch.factors["color"]).mean() >= 0.95
    np.testing.assert_allclose(table["x"], batch.factors["x"], atol=1.5)
    np.testing.assert_allclose(table["y"], batch.factors["y"], atol=1.5)
    np.testing.assert_allclose(table["size"], batch.factors["size"], atol=1.0)
    np.testing.assert_allclose(table["background"], batch.factors["background"], atol=0.05)
    for name, truth in world.binary_attributes(batch.factors).items():
        assert ((table[name].to_numpy() > 0.5) == truth).mean() >= 0.85, name
    scores = table[list(world.BINARY_ATTRIBUTES)].to_numpy()
    assert ((scores >= 0) & (scores <= 1)).all()
    np.testing.assert_allclose(table[["p_circle", "p_square", "p_triangle"]].sum(axis=1), 1.0, atol=1e-6)


def test_shipped_classifier_reads_colour_from_pixels_not_shape(shipped):
    # Non-red circles are rare in training data (20 % of circles); they must still read as
    # their own colour, and red squares/triangles as red.
    factors = world.sample_factors(12, seed=FRESH_SEED + 1)
    factors["shape"] = np.array([0] * 6 + [1] * 3 + [2] * 3)
    factors["color"] = np.array([1, 2, 1, 2, 1, 2, 0, 0, 0, 0, 0, 0])
    table = predict_attributes(shipped, world.render(factors).images)
    np.testing.assert_array_equal(table["color"].to_numpy(), factors["color"])
    np.testing.assert_array_equal(table["shape"].to_numpy(), factors["shape"])


def test_shipped_classifier_tolerates_noise_and_blur(shipped):
    batch = world.generate(64, seed=FRESH_SEED + 2)
    table = predict_attributes(shipped, degrade(torch.from_numpy(batch.images), seed=0, noise_std=0.1))
    assert (table["shape"].to_numpy() == batch.factors["shape"]).mean() >= 0.95
    assert (table["color"].to_numpy() == batch.factors["color"]).mean() >= 0.95


def test_world_labeller_wraps_the_classifier(shipped):
    labeller = WorldLabeller()
    assert {"is_circle", "is_red", "size", "p_square"} <= set(labeller.attributes)
    images = world.generate(8, seed=5).images
    np.testing.assert_allclose(labeller.score(images)["is_red"], predict_attributes(shipped, images)["is_red"])
    with pytest.raises(ValueError, match="32x32"):
        labeller.score(np.zeros((1, 3, 16, 16), dtype=np.float32))


def test_predict_attributes_columns_and_soft_scores():
    torch.manual_seed(0)
    model = ShapesClassifier(**TINY)
    images = world.generate(10, seed=3).images
    table = predict_attributes(model, images, batch_size=3)
    expected = ["shape", "color", "p_circle", "p_square", "p_triangle", "p_red", "p_green", "p_blue"]
    expected += ["size", "x", "y", "background", *world.BINARY_ATTRIBUTES]
    assert list(table.columns) == expected
    # ndarray or tensor, any batch size: the same scores (up to float rounding)
    whole = predict_attributes(model, torch.from_numpy(images)).to_numpy()
    np.testing.assert_allclose(table.to_numpy(), whole, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(table["is_circle"], table["p_circle"])
    np.testing.assert_array_equal(table["is_red"], table["p_red"])
    # 0.5 sits exactly on the world's threshold, on the right side of it.
    for name, (factor, threshold, above) in THRESHOLDED_ATTRIBUTES.items():
        past = table[factor] > threshold if above else table[factor] < threshold
        np.testing.assert_array_equal(table[name] > 0.5, past)
    assert model.training is False  # predict_attributes leaves it in eval mode
    with pytest.raises(ValueError, match=r"\(n, 3, 32, 32\)"):
        predict_attributes(model, np.zeros((2, 3, 16, 16), dtype=np.float32))


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = ShapesClassifier(**TINY, temperatures={"is_large": 0.3}).eval()
    save_classifier(model, tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["config.json", "model.safetensors"]
    loaded = load_classifier(tmp_path / "c")
    assert loaded.config == model.config and loaded.temperatures["is_large"] == 0.3
    images = world.generate(4, seed=1).images
    np.testing.assert_array_equal(predict_attributes(model, images).to_numpy(), predict_attributes(loaded, images).to_numpy())

    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_classifier(missing)
    (tmp_path / "no-weights").mkdir()
    (tmp_path / "no-weights" / "config.json").write_text(json.dumps(model.config))
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        load_classifier(tmp_path / "no-weights")
    (tmp_path / "c" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier(tmp_path / "c")
    (tmp_path / "c" / "config.json").write_text(json.dumps({**model.config, "width": 16}))
    with pytest.raises(ValueError, match="don't match"):
        load_classifier(tmp_path / "c")


def test_augment_is_seeded_and_moves_the_background_target_with_the_pixels():
    batch = world.generate(16, seed=9)
    images, background = torch.from_numpy(batch.images), torch.from_numpy(batch.factors["background"])
    masks = torch.from_numpy(batch.masks)
    settings = {"noise_max": 0.0, "blur_probability": 0.5, "contrast_jitter": 0.2, "brightness_jitter": 0.1}
    settings.update({"tint_probability": 0.5, "tint_max": 0.3})
    a, bg_a = augment(images, background, masks, torch.Generator().manual_seed(1), **settings)
    b, bg_b = augment(images, background, masks, torch.Generator().manual_seed(1), **settings)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(bg_a, bg_b, rtol=0, atol=0)
    assert not torch.equal(bg_a, background)
    # Without noise the corner pixel is pure background: its grey level is the new target,
    corner = a[:, :, 0, 0]
    torch.testing.assert_close((corner.mean(dim=1) + 1) / 2, bg_a, rtol=0, atol=1e-5)
    # and some backgrounds are now coloured, not grey.
    assert (corner.max(dim=1).values - corner.min(dim=1).values > 0.1).any()
    noisy, _ = augment(images, background, masks, torch.Generator().manual_seed(1), **{**settings, "noise_max": 0.3})
    assert noisy.min() >= -1 and noisy.max() <= 1 and not torch.equal(noisy, a)


def test_training_batches_draw_colour_independently_of_shape():
    config = ClassifierTrainConfig(batch_size=1500)
    factors = training_batch(config, step=0).factors
    circle = factors["shape"] == 0
    assert abs((factors["color"][circle] == 0).mean() - 1 / 3) < 0.06  # the world itself: 0.8
    np.testing.assert_array_equal(training_batch(config, 0).images[:5], training_batch(config, 0).images[:5])


def test_training_checkpoints_and_resumes_exactly(tmp_path):
    config = ClassifierTrainConfig(
        steps=4, batch_size=8, warmup_steps=1, **TINY, checkpoint_every=2, log_every=1, calibration_images=64
    )
    train_classifier(config, tmp_path / "split", until_step=3)
    folder = latest_checkpoint(tmp_path / "split")
    assert json.loads((folder / "state.json").read_text())["step"] == 3
    assert sorted(p.name for p in folder.iterdir()) == ["model.safetensors", "optimizer.safetensors", "state.json"]  # no EMA
    resumed = train_classifier(config, tmp_path / "split", export_dir=tmp_path / "export")
    assert json.loads((latest_checkpoint(tmp_path / "split") / "state.json").read_text())["step"] == 4
    records = [json.loads(line) for line in (tmp_path / "split" / LOG_FILE).read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # resumed at step 3, not from scratch
    assert all(np.isfinite(r["loss"]) for r in records)

    straight = train_classifier(config, tmp_path / "straight")
    for (name, p), q in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    exported = load_classifier(tmp_path / "export")
    assert exported.temperatures != ShapesClassifier().temperatures  # calibrated at export

    with pytest.raises(ValueError, match=r"another config \(differs in \['steps'\]\)"):
        train_classifier(config.model_copy(update={"steps": 5}), tmp_path / "split")


def test_train_config_is_strict():
    with pytest.raises(ValueError):
        ClassifierTrainConfig(step=10)  # typo: extra fields are refused
    config = ClassifierTrainConfig()
    with pytest.raises(ValueError):
        config.steps = 3  # frozen
    assert config.step_seed(config.steps - 1) < EVALUATION_SEED
