"""Disentangled supervised directions: the joint regression, and conditioning on all other attributes.

Each is checked against a hand computation on planted data, per step: numpy's least
squares (or the ridge formula), and v = v0 - Nᵀ(NNᵀ)⁻¹N v0 with N the others' directions.
"""

from __future__ import annotations

import dask.array as da
import numpy as np
import pandas as pd
import pytest
import xarray as xr

from hmine.directions import (
    H_DIMS,
    all_others,
    direction_by_name,
    fit_directions,
    mean_difference_direction,
    regression_directions,
)


def as_h(array: np.ndarray, *, steps, chunk=60, first_seed=1000) -> xr.DataArray:
    """A dask-backed h like the one xr.open_zarr gives: chunks (batch, 1, C, H, W)."""
    n = array.shape[0]
    coords = {"sample": np.arange(first_seed, first_seed + n), "step": np.asarray(steps, dtype=np.int64)}
    return xr.DataArray(da.from_array(array, chunks=(chunk, 1, *array.shape[2:])), dims=H_DIMS, coords=coords)



def three_attribute_world(n=240, seed=4):
    """h = sum over three correlated attribute scores of score * planted direction + noise, per step.

    is_red's score is mostly is_circle's and is_large's partly, so a mean difference of one
    attribute also moves h along the others' directions; the joint regression does not.
    """
    rng = np.random.default_rng(seed)
    steps, spatial = (900, 500, 0), (4, 2, 2)
    d = int(np.prod(spatial))
    circle = rng.uniform(size=n)
    red = np.clip(0.7 * circle + 0.3 * rng.uniform(size=n), 0, 1)
    large = np.clip(0.4 * red + 0.6 * rng.uniform(size=n), 0, 1)
    scores = np.stack([circle, red, large], axis=1)
    directions = rng.normal(size=(3, len(steps), d)) * 2.0  # (attribute, step, feature)
    array = np.einsum("na,atf->ntf", scores, directions) + 0.3 * rng.normal(size=(n, len(steps), d)) + 1.5
    h = as_h(array.reshape(n, len(steps), *spatial).astype(np.float32), steps=steps, chunk=60)
    labels = pd.DataFrame(scores, columns=["is_circle", "is_red", "is_large"], index=pd.Index(h["sample"].values, name="seed"))
    return h, labels.sample(frac=1.0, random_state=2), directions


def hand_ridge(h: xr.DataArray, labels: pd.DataFrame, alpha: float) -> np.ndarray:
    """(attribute, step, feature): B_t = (S_cᵀS_c + αI)⁻¹ S_cᵀ H_c,t, or numpy's lstsq when α = 0."""
    s = labels.loc[h["sample"].values].to_numpy(np.float64)
    s = s - s.mean(0)
    out = []
    for t in range(h.sizes["step"]):
        x = h.isel(step=t).values.reshape(h.sizes["sample"], -1).astype(np.float64)
        x = x - x.mean(0)
        if alpha == 0:
            out.append(np.linalg.lstsq(s, x, rcond=None)[0])
        else:
            out.append(np.linalg.solve(s.T @ s + alpha * np.eye(s.shape[1]), s.T @ x))
    return np.stack(out, axis=1)


def unit_per_step(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


@pytest.mark.parametrize("alpha", [0.0, 5.0])
def test_regression_directions_are_the_hand_computed_least_squares_per_step(alpha):
    h, labels, planted_directions = three_attribute_world()
    fitted = regression_directions(h, labels, alpha=alpha)
    assert list(fitted) == ["is_circle", "is_red", "is_large"]
    expected = hand_ridge(h, labels, alpha)
    for a, attribute in enumerate(fitted):
        coefficients = fitted[attribute]
        assert coefficients.dims == ("step", "channel", "y", "x") and coefficients["step"].values.tolist() == [900, 500, 0]
        np.testing.assert_allclose(coefficients.values.reshape(3, -1), expected[a], rtol=1e-8, atol=1e-10)
    if alpha == 0:
        # least squares recovers each planted direction (per step), although the scores are correlated
        for a, attribute in enumerate(fitted):
            cos = (unit_per_step(fitted[attribute].values.reshape(3, -1)) * unit_per_step(planted_directions[a])).sum(-1)
            assert cos.min() > 0.98, (attribute, cos)
        # is_red's mean difference leans towards is_circle's planted direction and misses its own
        md = unit_per_step(mean_difference_direction(h, labels["is_red"], top_k=60).values.reshape(3, -1))
        circle, red = unit_per_step(planted_directions[0]), unit_per_step(planted_directions[1])
        assert (md * circle).sum(-1).min() > 0.5 and (md * red).sum(-1).max() < 0.9
    with pytest.raises(ValueError, match="same score"):
        regression_directions(h, labels.assign(is_large=0.5))


def test_fit_directions_regression_and_conditioning_on_all_others_match_the_hand_formulas():
    h, labels, _ = three_attribute_world()
    attributes = ["is_circle", "is_red", "is_large"]
    ds = fit_directions(h, labels, pca_components=2, top_k=40, conditional="all", regression_alpha=0.5)
    names = ds["name"].values.astype(str).tolist()
    conditioned = {a: [o for o in attributes if o != a] for a in attributes}
    assert all_others(attributes) == conditioned and all_others(["is_red"]) == {}
    for base in ("mean_difference", "probe"):
        for a in attributes:
            assert f"conditional/{base}/{a}|{','.join(conditioned[a])}" in names
    assert names[-3:] == [f"regression/{a}" for a in attributes]
    x = h.values.astype(np.float64).reshape(h.sizes["sample"], 3, -1)  # (sample, step, feature)

    def check(name, expected_raw):  # unit per step, and scale_unit = std of the data along it
        stored = direction_by_name(ds, name)
        unit = stored["direction"].values.reshape(3, -1)
        np.testing.assert_allclose(unit, unit_per_step(expected_raw), atol=1e-9)
        np.testing.assert_allclose(stored["scale_unit"].values, np.einsum("ntf,tf->nt", x, unit).std(0, ddof=1), rtol=1e-9)
        assert stored["method"].item() == name.split("/")[0] and stored["attribute"].item() in name

    ridge = hand_ridge(h, labels[attributes], 0.5)
    for a, attribute in enumerate(attributes):
        check(f"regression/{attribute}", ridge[a])
    for base in ("mean_difference", "probe"):
        for attribute in attributes:
            v0 = direction_by_name(ds, f"{base}/{attribute}")["direction"].values.reshape(3, -1)
            others = np.stack([direction_by_name(ds, f"{base}/{o}")["direction"].values.reshape(3, -1) for o in conditioned[attribute]])
            # v = v0 - Nᵀ(NNᵀ)⁻¹N v0 at every step, N the other attributes' directions (rows)
            expected = np.stack([
                v0[t] - others[:, t].T @ np.linalg.solve(others[:, t] @ others[:, t].T, others[:, t] @ v0[t]) for t in range(3)
            ])  # fmt: skip
            check(f"conditional/{base}/{attribute}|{','.join(conditioned[attribute])}", expected)
    off = fit_directions(h, labels, pca_components=2, top_k=40, regression=False)
    assert not any(n.startswith(("regression/", "conditional/")) for n in off["name"].values.astype(str))
    assert off.attrs["hmine:regression_alpha"] == "off"
    with pytest.raises(ValueError, match="mapping or 'all'"):
        fit_directions(h, labels, pca_components=2, top_k=40, conditional="every")


def test_the_config_takes_conditional_all_and_the_regression_settings():
    from hmine.config import ConfigError, DirectionsConfig, load_config

    assert DirectionsConfig().regression is True and DirectionsConfig().regression_alpha == 1e-3
    assert DirectionsConfig().conditional == {}
    config = load_config(None, ["directions.conditional=all", "directions.regression_alpha=0.1", "directions.regression=false"])
    assert config.directions.conditional == "all" and config.directions.regression_alpha == 0.1
    assert config.directions.regression is False
    assert load_config(None, ["directions.conditional={is_red: [is_circle]}"]).directions.conditional == {"is_red": ["is_circle"]}
    for bad in ("directions.conditional=some", "directions.regression_alpha=0"):
        with pytest.raises(ConfigError, match="directions"):
            load_config(None, [bad])
