import numpy as np
import pytest
import torch

from hmine import world
from hmine.classifier import (
    ClassifierTrainConfig,
    ShapesClassifier,
    load_classifier,
    predict_attributes,
    save_classifier,
    train_classifier,
)
from hmine.labelling import WorldLabeller, embedded_classifier_path


@pytest.fixture(scope="module")
def shipped():
    return load_classifier(embedded_classifier_path())


def test_shipped_classifier_scores_fresh_world_images(shipped):
    batch = world.generate(64, seed=123_456_789)  # outside the training and evaluation seeds
    table = predict_attributes(shipped, batch.images)
    assert (table["shape"].to_numpy() == batch.factors["shape"]).mean() >= 0.95
    assert (table["color"].to_numpy() == batch.factors["color"]).mean() >= 0.95
    np.testing.assert_allclose(table["x"], batch.factors["x"], atol=1.5)
    np.testing.assert_allclose(table["size"], batch.factors["size"], atol=1.0)
    for name, truth in world.binary_attributes(batch.factors).items():
        assert ((table[name].to_numpy() > 0.5) == truth).mean() >= 0.85, name
    assert ((table[["is_circle", "is_red", "is_large"]] >= 0) & (table[["is_circle", "is_red", "is_large"]] <= 1)).all().all()


def test_world_labeller_wraps_the_classifier(shipped):
    labeller = WorldLabeller()
    assert {"is_circle", "is_red", "size", "p_square"} <= set(labeller.attributes)
    images = world.generate(8, seed=5).images
    np.testing.assert_allclose(labeller.score(images)["is_red"], predict_attributes(shipped, images)["is_red"])
    with pytest.raises(ValueError, match="32x32"):
        labeller.score(np.zeros((1, 3, 16, 16), dtype=np.float32))


def test_save_load_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    model = ShapesClassifier(width=8, hidden=16).eval()
    save_classifier(model, tmp_path / "c")
    loaded = load_classifier(tmp_path / "c")
    images = world.generate(4, seed=1).images
    a, b = predict_attributes(model, images), predict_attributes(loaded, images)
    np.testing.assert_array_equal(a.to_numpy(), b.to_numpy())
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_classifier(tmp_path / "missing")
    (tmp_path / "c" / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="corrupt"):
        load_classifier(tmp_path / "c")


def test_training_checkpoints_and_resumes(tmp_path):
    config = ClassifierTrainConfig(steps=3, batch_size=8, width=8, hidden=16, checkpoint_every=2, log_every=1)
    train_classifier(config, tmp_path / "w")
    state = torch.load(tmp_path / "w" / "checkpoint.pt", weights_only=True)
    assert int(state["step"]) == 3
    longer = config.model_copy(update={"steps": 4})
    with pytest.raises(ValueError, match="another classifier config"):
        train_classifier(longer, tmp_path / "w")
