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
    # either way, among all four: decisions F F F T -> F F T T (0.3 + 0.2 stays at 0.5), one changes
    assert effects.loc[(1.0, "bright"), "changed_decision"] == pytest.approx(1 / 4)
    # dim: F F T T -> F T T T
    assert effects.loc[(1.0, "dim"), "changed_decision"] == pytest.approx(1 / 4)
    assert effects.loc[(1.0, "bright"), "mean_change_std"] == pytest.approx(0.2 / np.std(before, ddof=1))
    assert effects.loc[(0.0, "dim"), "changed_decision"] == 0.0 and effects.loc[(0.0, "dim"), "mean_change_std"] == 0.0
    # an attribute without a threshold is continuous: a change in stds, no decisions
    continuous = measure_effects(group, ["up"], [0.0, 1.0], MeanLabeller(), {"bright": 0.5}).set_index(["scale", "attribute"])
    assert np.isnan(continuous.loc[(1.0, "dim"), ["changed_decision", "flip_to_positive"]].astype(float)).all()
    assert continuous.loc[(1.0, "dim"), "mean_change_std"] == pytest.approx(0.2 / np.std(before, ddof=1))


# -- effects at matched strength --------------------------------------------------------


def effects_table(curves: dict) -> pd.DataFrame:
    """An effects table from {(direction, attribute): {scale: {column: value}}}; unset columns NaN."""
    rows = [
        {"direction": d, "scale": scale, "attribute": a, "mean_score": 0.5, "mean_change": 0.0, **values}
        for (d, a), by_scale in curves.items() for scale, values in by_scale.items()
    ]  # fmt: skip
    return pd.DataFrame(rows)


def zero(**extra):
    return {"flip_to_positive": 0.0, "flip_to_negative": 0.0, "changed_decision": 0.0, "mean_change_std": 0.0, **extra}


PLANTED = effects_table({
    # probe/a: + side reaches 0.9 between 5 (0.5) and 10 (1.0), at 9; - side tops out at 0.6
    ("probe/a", "a"): {-10.0: {"flip_to_negative": 0.6, "flip_to_positive": 0.0, "changed_decision": 0.6},
                       -5.0: {"flip_to_negative": 0.3, "flip_to_positive": 0.0, "changed_decision": 0.3},
                       0.0: zero(),
                       5.0: {"flip_to_positive": 0.5, "flip_to_negative": 0.0, "changed_decision": 0.5},
                       10.0: {"flip_to_positive": 1.0, "flip_to_negative": 0.0, "changed_decision": 1.0}},
    ("probe/a", "b"): {-10.0: {"changed_decision": 0.2, "mean_change_std": 0.4},
                       -5.0: {"changed_decision": 0.1, "mean_change_std": 0.2},
                       0.0: zero(), 5.0: {"changed_decision": 0.1, "mean_change_std": -0.5},
                       10.0: {"changed_decision": 0.3, "mean_change_std": -1.0}},
    ("probe/a", "c"): {-10.0: {"mean_change_std": 0.1}, -5.0: {"mean_change_std": 0.1}, 0.0: zero(),
                       5.0: {"mean_change_std": 0.2}, 10.0: {"mean_change_std": 1.2}},  # continuous: no decision
    # conditional/probe/b|a,c: every sample starts negative on b (no - side); 0.95 at +5 already
    ("conditional/probe/b|a,c", "b"): {-5.0: {"flip_to_negative": np.nan, "flip_to_positive": 0.0},
                                       0.0: zero(flip_to_negative=np.nan),
                                       5.0: {"flip_to_positive": 0.95, "flip_to_negative": np.nan, "changed_decision": 0.95}},
    ("conditional/probe/b|a,c", "a"): {-5.0: {"changed_decision": 0.5}, 0.0: zero(), 5.0: {"changed_decision": 0.05}},
    ("conditional/probe/b|a,c", "c"): {-5.0: {"mean_change_std": 2.0}, 0.0: zero(), 5.0: {"mean_change_std": 0.1}},
    # not supervised: no own attribute in the table
    ("pca/0", "a"): {0.0: zero(), 5.0: {"flip_to_positive": 1.0}},
    ("jacobian/localised/0", "a"): {0.0: zero(), 5.0: {"flip_to_positive": 1.0}},
})  # fmt: skip


def test_the_matched_scale_is_interpolated_linearly_between_edited_scales():
    from hmine.strength import first_crossing

    assert first_crossing(np.array([0.0, 5.0, 10.0]), np.array([0.0, 0.5, 1.0])) == pytest.approx(9.0)
    assert first_crossing(np.array([0.0, 5.0, 10.0]), np.array([0.0, 0.9, 1.0])) == 5.0  # exactly at an edited scale
    # the first crossing walking out from 0, not the best rate; NaN rates are left out
    assert first_crossing(np.array([0.0, 5.0, 10.0, 20.0]), np.array([0.0, 0.95, np.nan, 0.7])) == pytest.approx(5 * 0.9 / 0.95)
    assert np.isnan(first_crossing(np.array([0.0, 5.0, 10.0]), np.array([0.0, 0.3, 0.89])))


def test_matched_strength_reads_the_scale_and_the_leakage_there():
    from hmine.strength import matched_strength

    table = matched_strength(PLANTED, ["a", "b", "c"])
    assert set(table.index) == {("probe/a", "+"), ("probe/a", "-"), ("conditional/probe/b|a,c", "+")}
    plus = table.loc[("probe/a", "+")]
    assert plus["attribute"] == "a" and plus["reached"] and plus["scale"] == pytest.approx(9.0)
    # at 9 = 5 + 0.8 * (10 - 5): every other quantity 80 % of the way from its value at 5 to that at 10
    assert plus["changed_decision:b"] == pytest.approx(0.1 + 0.8 * 0.2)
    assert plus["mean_change_std:b"] == pytest.approx(-0.5 + 0.8 * -0.5)
    assert plus["mean_change_std:c"] == pytest.approx(0.2 + 0.8 * 1.0)
    assert np.isnan(plus["changed_decision:c"])  # c is continuous: its 0 at scale 0 is not extrapolated
    assert plus["leak_decision"] == pytest.approx(0.26) and plus["leak_std"] == pytest.approx(1.0)
    assert "changed_decision:a" not in table.columns or np.isnan(plus.get("changed_decision:a", np.nan))
    # not reached on the - side: best 0.6 at -10, no scale, no leakage
    minus = table.loc[("probe/a", "-")]
    assert not minus["reached"] and np.isnan(minus["scale"]) and minus["best_rate"] == pytest.approx(0.6)
    assert minus["largest_scale"] == -10.0 and np.isnan(minus["leak_decision"]) and np.isnan(minus["changed_decision:b"])
    # a conditional direction on many others: its attribute is the one before "|"; 0.9 between 0 and 5
    conditional = table.loc[("conditional/probe/b|a,c", "+")]
    assert conditional["attribute"] == "b" and conditional["scale"] == pytest.approx(5 * 0.9 / 0.95)
    assert conditional["changed_decision:a"] == pytest.approx(0.05 * 0.9 / 0.95)
    assert conditional["mean_change_std:c"] == pytest.approx(0.1 * 0.9 / 0.95)


def test_matched_strength_display_and_old_tables_without_leakage_columns():
    from hmine.strength import matched_strength, matched_strength_display

    shown = matched_strength_display(matched_strength(PLANTED, ["a", "b", "c"]))
    assert shown.loc[("probe/a", "+"), "scale"] == "+9.00"
    assert shown.loc[("probe/a", "-"), "scale"] == "not reached (best 0.60 up to -10)"
    # clean: reached with <= 10 % of any other decision changed
    assert shown["clean"].to_dict() == {("conditional/probe/b|a,c", "+"): "yes", ("probe/a", "+"): "no", ("probe/a", "-"): "no"}
    old = matched_strength(PLANTED.drop(columns=["changed_decision", "mean_change_std"]), ["a", "b", "c"])
    assert old.loc[("probe/a", "+"), "scale"] == pytest.approx(9.0) and np.isnan(old.loc[("probe/a", "+"), "leak_decision"])


def test_default_edit_selection_and_name_parsing_with_many_other_attributes():
    import xarray as xr

    from hmine.report import best_flip_rates
    from hmine.stages.edit import select_directions, strip_filename
    from hmine.strength import direction_attribute

    names = ["pca/0", "probe/a", "conditional/probe/a|b,c,d", "conditional/mean_difference/b|a,c,d", "regression/a"]
    methods = ["pca", "probe", "conditional", "conditional", "regression"]
    directions = xr.Dataset(coords={"name": ("direction", names), "method": ("direction", methods)})
    assert select_directions(directions, []) == names[1:]  # every supervised direction, regression included
    assert select_directions(directions, ["conditional/probe/a|b,c,d"]) == ["conditional/probe/a|b,c,d"]
    assert [direction_attribute(n) for n in names[1:]] == ["a", "a", "b", "a"]
    assert len({strip_filename(n) for n in names}) == len(names)
    flips = best_flip_rates(PLANTED)
    assert flips.loc["conditional/probe/b|a,c", "attribute"] == "b" and flips.loc["probe/a", "best flip rate"] == 1.0
