"""Effects at matched strength: how far each supervised direction must go to flip its attribute.

A fixed edit scale (the attribute-change matrix reads one) is a different strength for
every direction: one flips its attribute at 5 std, another needs 20, and leakage grows
with the scale. This module reads the edit stage's effects table
(:func:`hmine.effects.measure_effects`: rows direction, scale, attribute) and, for each
supervised direction and each side (negative, positive scales), finds the smallest |scale|
at which the intended decision flips in at least ``level`` (default 90 %) of the edited
samples on its far side — positive samples turning negative at negative scales
(``flip_to_negative``), negative ones turning positive at positive scales
(``flip_to_positive``) — and the leakage there: for every other attribute the share of
samples whose decision changes (``changed_decision``) and the mean change of its score in
units of the std of its unedited scores (``mean_change_std``) — and the image quality there
(:mod:`hmine.quality`: ``confident_share``, the share of edited images the classifier still
scores confidently, and ``frechet_distance`` to the unedited images in its feature space).

Interpolation: between the edited scales of one side, including scale 0 (the unedited
regeneration: no flips, no change), every quantity is taken as linear in |scale|. The
matched scale is where that piecewise-linear flip rate first reaches ``level``, walking
out from 0; the leakage is interpolated linearly at that scale. When no edited scale of a
side reaches ``level`` the side is "not reached": its scale and leakage are NaN.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The share of far-side samples whose intended decision must flip.
LEVEL = 0.9
#: The share of other decisions that may change, for an edit to count as clean.
MAX_LEAKAGE = 0.1
SIDES = {"-": "flip_to_negative", "+": "flip_to_positive"}
_VALUES = ("flip_to_positive", "flip_to_negative", "changed_decision", "mean_change_std")
_QUALITY = ("confident_share", "frechet_distance")  # per (direction, scale): read off the own attribute's rows


def direction_attribute(name: str) -> str:
    """The attribute a direction name is about: ``probe/is_red``, ``regression/is_red``,
    ``conditional/mean_difference/is_red|is_circle,is_large`` → ``is_red``; an entry global at
    t or a combination (:mod:`hmine.edit_names`) is about its first term's: ``probe/is_red@t500``,
    ``probe/is_red - 0.5*probe/is_circle`` → ``is_red``."""
    from hmine.edit_names import parse_edit

    try:
        name = parse_edit(name)[0].name
    except ValueError:  # not an edit.directions entry: the name as it is
        pass
    return name.split("/")[-1].split("|")[0]


def first_crossing(scales: np.ndarray, rates: np.ndarray, level: float = LEVEL) -> float:
    """The smallest x where the piecewise-linear curve through (scales, rates) reaches ``level``.

    ``scales`` ascending (|scale| of one side, starting at 0); points with a NaN rate are
    left out. NaN when no point reaches ``level``.
    """
    keep = np.isfinite(rates)
    xs, ys = np.asarray(scales, dtype=float)[keep], np.asarray(rates, dtype=float)[keep]
    for k in np.flatnonzero(ys >= level)[:1]:
        if k == 0:
            return float(xs[0])
        x0, x1, y0, y1 = xs[k - 1], xs[k], ys[k - 1], ys[k]
        return float(x0 + (level - y0) / (y1 - y0) * (x1 - x0))  # y0 < level <= y1
    return float("nan")


def _at(scales: np.ndarray, values: np.ndarray, x: float) -> float:
    """``values`` interpolated linearly in |scale| at ``x`` between the scales where they are finite;
    NaN when x is NaN or outside them (never extrapolated)."""
    keep = np.isfinite(values)
    if not np.isfinite(x) or not keep.any() or not scales[keep].min() <= x <= scales[keep].max():
        return float("nan")
    return float(np.interp(x, scales[keep], values[keep]))


def _side(rows: pd.DataFrame, attribute: str, others: list[str], side: str, level: float) -> dict | None:
    """One direction's matched strength on one side; None when the side has no far-side samples."""
    sign = -1.0 if side == "-" else 1.0
    on_side = rows[(np.sign(rows["scale"]) == sign) | (rows["scale"] == 0)]
    table = on_side.assign(scale=on_side["scale"].abs()).set_index(["scale", "attribute"])[[*_VALUES, *_QUALITY]]
    table = table.unstack("attribute").sort_index()  # columns (value, attribute); rows |scale|
    if 0.0 not in table.index:  # the unedited point, by definition (its confident share unknown)
        table.loc[0.0] = 0.0
        table.loc[0.0, "confident_share"] = np.nan
        table = table.sort_index()
    rates = table[(SIDES[side], attribute)].to_numpy(dtype=float) if (SIDES[side], attribute) in table else None
    edited = table.index.to_numpy() > 0
    if rates is None or not np.isfinite(rates[edited]).any():
        return None  # no sample on the far side of this attribute (or a continuous attribute)
    rates = np.where(edited, rates, 0.0)
    scales = table.index.to_numpy(dtype=float)
    matched = first_crossing(scales, rates, level)
    row = {
        "attribute": attribute,
        "scale": sign * matched,
        "reached": bool(np.isfinite(matched)),
        "best_rate": float(np.nanmax(rates[edited])),
        "largest_scale": sign * float(scales.max()),
    }
    for column in ("changed_decision", "mean_change_std"):
        for other in others:
            values = table[(column, other)].to_numpy(dtype=float) if (column, other) in table else np.full(len(scales), np.nan)
            row[f"{column}:{other}"] = _at(scales, values, matched)
    for column in _QUALITY:
        row[column] = _at(scales, table[(column, attribute)].to_numpy(dtype=float), matched)
    decisions = [row[f"changed_decision:{o}"] for o in others]
    changes = [abs(row[f"mean_change_std:{o}"]) for o in others]
    row["leak_decision"] = max((v for v in decisions if np.isfinite(v)), default=float("nan"))
    row["leak_std"] = max((v for v in changes if np.isfinite(v)), default=float("nan"))
    return row


def matched_strength(effects: pd.DataFrame, attributes: list[str] | None = None, level: float = LEVEL) -> pd.DataFrame:
    """Per supervised direction and side: the scale that flips ``level`` of its far side, and the leakage there.

    Parameters
    ----------
    effects : pandas.DataFrame
        The edit stage's effects table. Tables written before ``changed_decision`` and
        ``mean_change_std`` existed give NaN leakage.
    attributes : list of str, optional
        The attributes whose leakage is reported (all of the table's by default).
    level : float
        The flip rate to reach.

    Returns
    -------
    pandas.DataFrame
        Indexed by (direction, side), side "-" or "+". Columns: ``attribute`` (the
        direction's own), ``scale`` (signed; NaN when not reached), ``reached``,
        ``best_rate`` (the highest flip rate at an edited scale of that side),
        ``largest_scale`` (the side's largest edited scale), ``leak_decision`` (the largest
        ``changed_decision`` of another attribute at the matched scale), ``leak_std`` (the
        largest |``mean_change_std``| of another attribute there), and per other attribute
        ``changed_decision:<b>`` and ``mean_change_std:<b>`` (NaN for the own attribute).
        Directions whose own attribute is not binary in the table (PCA, Jacobian) are left out.
    """
    effects = effects.copy()
    for column in (*_VALUES, *_QUALITY):
        if column not in effects:
            effects[column] = np.nan
    attributes = list(dict.fromkeys(effects["attribute"])) if attributes is None else list(attributes)
    rows = {}
    for name, group in effects.groupby("direction", sort=True):
        attribute = direction_attribute(str(name))
        if attribute not in set(group["attribute"]):
            continue
        others = [a for a in attributes if a != attribute]
        for side in SIDES:
            row = _side(group, attribute, others, side, level)
            if row is not None:
                rows[(name, side)] = row
    index = pd.MultiIndex.from_tuples(list(rows), names=["direction", "side"])
    return pd.DataFrame(list(rows.values()), index=index)


def matched_strength_display(table: pd.DataFrame, max_leakage: float = MAX_LEAKAGE) -> pd.DataFrame:
    """:func:`matched_strength`'s table for reading: the scale or "not reached (best r at s)",
    the leakage, the image quality, whether the edit is clean (reached with ``leak_decision`` <= ``max_leakage``),
    and the other attributes' changed decisions."""
    if table.empty:
        return table
    shown = pd.DataFrame(index=table.index)
    shown["attribute"] = table["attribute"]
    shown["scale"] = [
        f"{row.scale:+.2f}" if row.reached else f"not reached (best {row.best_rate:.2f} up to {row.largest_scale:+g})"
        for row in table.itertuples()
    ]
    shown["max changed decision"] = table["leak_decision"]
    shown["max |change| / std"] = table["leak_std"]
    shown["confident"] = table["confident_share"]
    shown["Fréchet distance"] = table["frechet_distance"]
    shown["clean"] = np.where(table["reached"] & (table["leak_decision"] <= max_leakage), "yes", "no")
    for column in (c for c in table.columns if c.startswith("changed_decision:")):
        shown[column.split(":", 1)[1]] = table[column]
    return shown
