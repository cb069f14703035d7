"""The benchmark table from per-direction effects tables: matching, matched strength, the random baseline.

Unsupervised directions (PCA components, per-image Jacobian vectors) are matched to the
factor they move most, per method (:func:`match_components`).

Input: one effects table per edited candidate (:func:`hmine.effects.measure_effects`, rows
scale x attribute, scales on both sides of 0). Output: one row per (method, attribute,
side) — ``side`` "+" flips negative samples to positive at positive scales, "-" the reverse —
with the strength to flip :data:`hmine.strength.LEVEL` of the far side, the leakage and the
image quality there (:func:`hmine.strength.matched_strength`), and how the random baseline
does at the same norm of delta h.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hmine.strength import LEVEL, MAX_LEAKAGE, SIDES, matched_strength

#: The largest mean change (in std of the unedited scores) of a continuous factor a clean edit may make.
MAX_CONTINUOUS_CHANGE = 0.25

TABLE_COLUMNS = (
    "method", "attribute", "side", "direction", "reached", "scale", "norm", "best_rate", "leak_decision",
    "leak_continuous", "confident_share", "frechet_distance", "random_rate_at_norm", "margin", "clean", "n_samples",
)  # fmt: skip


def slopes(effects: pd.DataFrame, attributes) -> pd.Series:
    """Per attribute, the mean over the edited scales s > 0 of (change at +s - change at -s) / 2,
    the change being ``mean_change_std``: how much (and which way) a direction moves each one."""
    table = effects.pivot_table(index="scale", columns="attribute", values="mean_change_std", aggfunc="mean")
    positive = [s for s in table.index if s > 0 and -s in table.index]
    if not positive:
        raise ValueError("the effects table needs scales on both sides of 0 (+s and -s) to match a direction")
    half = np.mean([(table.loc[s] - table.loc[-s]) / 2 for s in positive], axis=0)
    return pd.Series(half, index=table.columns).reindex(list(attributes))


def match_components(effects_by_name: dict[str, pd.DataFrame], attributes) -> dict[str, tuple[str, float]]:
    """Match each direction to the attribute it moves most; per attribute, the direction that moves it
    most among those matched to it, with the sign that makes positive scales raise it.

    Returns ``{attribute: (name, sign)}``; an attribute no direction is matched to is left out.
    """
    best: dict[str, tuple[str, float, float]] = {}
    for name, effects in effects_by_name.items():
        moves = slopes(effects, attributes)
        if not moves.abs().notna().any():
            continue
        attribute = moves.abs().idxmax()
        size, sign = abs(moves[attribute]), float(np.sign(moves[attribute]) or 1.0)
        if attribute not in best or size > best[attribute][2]:
            best[attribute] = (name, sign, size)
    return {attribute: (name, sign) for attribute, (name, sign, _) in best.items()}


def oriented(effects: pd.DataFrame, sign: float) -> pd.DataFrame:
    """The effects of the direction times ``sign``: scales negated when ``sign`` < 0."""
    return effects if sign > 0 else effects.assign(scale=-effects["scale"])


def _flip_curve(effects: pd.DataFrame, attribute: str, side: str) -> tuple[np.ndarray, np.ndarray]:
    """|scale| and the flip rate of ``attribute`` on ``side``, from 0 (no flips) outwards."""
    sign = -1.0 if side == "-" else 1.0
    own = effects[(effects["attribute"] == attribute) & (np.sign(effects["scale"]) == sign)]
    scales = np.concatenate([[0.0], own["scale"].abs().to_numpy(dtype=float)])
    rates = np.concatenate([[0.0], own[SIDES[side]].to_numpy(dtype=float)])
    order = np.argsort(scales)
    return scales[order], rates[order]


def rate_at_norm(effects: pd.DataFrame, attribute: str, side: str, norm_per_scale: float, norm: float) -> float:
    """The flip rate of a direction (``effects``, ``norm_per_scale``) at ||delta h|| = ``norm``, interpolated;
    NaN beyond its largest edit."""
    scales, rates = _flip_curve(effects, attribute, side)
    keep = np.isfinite(rates)
    x = norm / norm_per_scale if norm_per_scale > 0 else np.nan
    if not np.isfinite(x) or not keep.any() or x > scales[keep].max():
        return float("nan")
    return float(np.interp(x, scales[keep], rates[keep]))


def _rows(method: str, attribute: str, direction: str, effects: pd.DataFrame, norm_per_scale: float,
          binary, continuous, own_factor: dict[str, str]) -> list[dict]:  # fmt: skip
    """The benchmark rows of one direction read against one attribute (both sides)."""
    named = effects.assign(direction=f"{method}/{attribute}")
    table = matched_strength(named, [*binary, *continuous])
    rows = []
    for (_, side), found in table.iterrows():
        if found["attribute"] != attribute:
            continue
        skipped = own_factor.get(attribute)  # is_large is about size: its change is no leakage
        changes = [abs(found.get(f"mean_change_std:{c}", np.nan)) for c in continuous if c != skipped]
        finite = [c for c in changes if np.isfinite(c)]
        rows.append({
            "method": method, "attribute": attribute, "side": side, "direction": direction,
            "reached": bool(found["reached"]), "scale": float(found["scale"]),
            "norm": abs(float(found["scale"])) * norm_per_scale, "best_rate": float(found["best_rate"]),
            "leak_decision": float(found["leak_decision"]),
            "leak_continuous": max(finite) if finite else float("nan"),
            "confident_share": float(found["confident_share"]), "frechet_distance": float(found["frechet_distance"]),
            **{k: float(v) for k, v in found.items() if k.startswith(("changed_decision:", "mean_change_std:"))},
        })  # fmt: skip
    return rows


def benchmark_table(candidates, effects_by_name: dict[str, pd.DataFrame], norms: dict[str, float],
                    binary, continuous=(), own_factor: dict[str, str] | None = None,
                    n_samples: dict[str, int] | None = None) -> pd.DataFrame:  # fmt: skip
    """One row per (method, attribute, side): see :data:`TABLE_COLUMNS` and the module docstring.

    Parameters
    ----------
    candidates : list of :class:`hmine.benchmark.candidates.Candidate`
    effects_by_name : dict
        Each candidate's effects table (its scale-0 rows included).
    norms : dict
        Each candidate's ||delta h|| per unit of scale (:func:`hmine.benchmark.candidates.norm_per_scale`).
    binary, continuous : sequence of str
        The binary attributes (each benchmarked) and the continuous factors (leakage only).
    own_factor : dict, optional
        The continuous factor a binary attribute is read off (``is_large`` -> ``size``),
        left out of that attribute's continuous leakage.
    n_samples : dict, optional
        How many samples each candidate edited (column ``n_samples``; NaN when not given).
    """
    own_factor = own_factor or {}
    rows = []
    # unsupervised families (PCA components, per-image Jacobian vectors): each matched to factors
    for method in dict.fromkeys(c.method for c in candidates if c.attribute is None and c.method != "random"):
        family = {c.name: effects_by_name[c.name] for c in candidates if c.method == method}
        for attribute, (name, sign) in match_components(family, binary).items():
            direction = name if sign > 0 else f"-{name}"
            rows += _rows(method, attribute, direction, oriented(family[name], sign), norms[name], binary, continuous, own_factor)
    for c in candidates:
        targets = [c.attribute] if c.attribute is not None else (binary if c.method == "random" else [])
        for attribute in targets:
            rows += _rows(c.method, attribute, c.name, effects_by_name[c.name], norms[c.name], binary, continuous, own_factor)
    table = pd.DataFrame(rows)
    if table.empty:
        return pd.DataFrame(columns=list(TABLE_COLUMNS))
    random = next((c for c in candidates if c.method == "random"), None)
    table["random_rate_at_norm"] = [
        rate_at_norm(effects_by_name[random.name], row.attribute, row.side, norms[random.name], row.norm)
        if random is not None and row.reached and row.method != "random" else float("nan")
        for row in table.itertuples()
    ]  # fmt: skip
    table["margin"] = LEVEL - table["random_rate_at_norm"]
    table["n_samples"] = table["direction"].str.lstrip("-").map(n_samples or {}).astype(float)
    table["clean"] = (
        table["reached"] & (table["leak_decision"] <= MAX_LEAKAGE) & ~(table["leak_continuous"] > MAX_CONTINUOUS_CHANGE)
    )
    first = list(TABLE_COLUMNS)
    return table[first + [c for c in table.columns if c not in first]].sort_values(["attribute", "side", "method"], ignore_index=True)


def best_per_attribute(table: pd.DataFrame) -> pd.DataFrame:
    """Per (attribute, side), the best method other than the random baseline: a clean one with
    the least leakage, else a reached one with the least leakage, else the highest flip rate.

    Only directions measured on the most samples compete: a per-image Jacobian direction read
    on its few analysed samples stays in the table, but its rates are too coarse to rank.
    """
    rows = []
    table = table[table["method"] != "random"]
    if "n_samples" in table and table["n_samples"].notna().any():
        table = table[table["n_samples"] == table["n_samples"].max()]
    for (attribute, side), group in table.groupby(["attribute", "side"], sort=True):
        ranked = group.assign(
            _tier=np.where(group["clean"], 0, np.where(group["reached"], 1, 2)),
            _leak=group["leak_decision"].fillna(np.inf),
            _rate=-group["best_rate"],
        ).sort_values(["_tier", "_leak", "_rate"])
        rows.append(ranked.iloc[0].drop(["_tier", "_leak", "_rate"]))
    return pd.DataFrame(rows).reset_index(drop=True)
