"""Decision thresholds and the effects table, on hand-made scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmine.effects import measure_effects
from hmine.labelling import decision_thresholds


class MeanLabeller:
    """Scores an image by its mean pixel value: 'bright' as is, 'dim' shifted up by 0.3."""

    def score(self, images: np.ndarray) -> pd.DataFrame:
        mean = images.reshape(len(images), -1).mean(axis=1)
        return pd.DataFrame({"bright": mean, "dim": mean + 0.3})


def test_median_thresholds_split_each_attribute_in_halves():
    labels = pd.DataFrame({"a": [0.9, 0.95, 0.97, 0.99], "b": [0.1, 0.2, 0.3, 0.4]})
    thresholds = decision_thresholds(labels, ["a", "b"], "median")
    assert thresholds == pytest.approx({"a": 0.96, "b": 0.25})
    assert (labels.gt(pd.Series(thresholds)).sum() == 2).all()
    assert decision_thresholds(None, ["a", "b"], 0.5) == {"a": 0.5, "b": 0.5}


def test_flips_are_counted_against_each_attributes_own_threshold():
    # one direction, scales (0, 1), four samples whose mean moves from m to m + 0.2
    before = np.array([0.1, 0.3, 0.45, 0.6])
    images = np.empty((1, 2, 4, 3, 2, 2), dtype=np.float32)  # (direction, scale, sample, C, H, W)
    images[0, 0] = before[:, None, None, None]
    images[0, 1] = (before + 0.2)[:, None, None, None]
    group = {"images": images}
    thresholds = {"bright": 0.5, "dim": 0.7}
    effects = measure_effects(group, ["up"], [0.0, 1.0], MeanLabeller(), thresholds).set_index(["scale", "attribute"])
    # bright: negatives 0.1, 0.3, 0.45 -> 0.3, 0.5, 0.65: one of three crosses 0.5
    assert effects.loc[(1.0, "bright"), "flip_to_positive"] == pytest.approx(1 / 3)
    # dim (score + 0.3, threshold 0.7): negatives 0.4, 0.6 -> 0.6, 0.8: one of two crosses 0.7
    assert effects.loc[(1.0, "dim"), "flip_to_positive"] == pytest.approx(1 / 2)
    assert effects.loc[(1.0, "bright"), "mean_change"] == pytest.approx(0.2)
    assert effects.loc[(1.0, "bright"), "flip_to_negative"] == 0.0  # 0.6 -> 0.8 stays positive
