"""What an edit changes: attribute scores of edited images against the unedited ones.

For each (direction, scale, attribute): the mean score of the edited images, its mean
change against the scale-0 images (the unedited regeneration of the same seeds), the
change in units of the std of the unedited scores, and for binary attributes the share of
samples whose decision (score > threshold) flipped, either way and in each direction —
the analogue of Haas et al. Table I (diagonal: the intended effect; off-diagonal:
leakage). Each row also carries the image quality of its (direction, scale)
(:mod:`hmine.quality`: ``confident_share``, ``frechet_distance`` to the unedited images;
the same value on every attribute's row of that direction and scale). :mod:`hmine.strength`
reads these at a matched edit strength.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

#: The effects table's columns, in order.
EFFECT_COLUMNS = (
    "direction", "scale", "attribute", "mean_score", "mean_change", "mean_change_std",
    "flip_to_positive", "flip_to_negative", "changed_decision", "confident_share", "frechet_distance",
)  # fmt: skip


def measure_effects(group, names, scales, labeller, thresholds: dict[str, float]) -> pd.DataFrame:
    """Per (direction, scale, attribute): mean score, mean change and decision changes.

    Changes are measured against the scale-0 images of the same direction (the unedited
    regeneration), sample by sample:

    * ``mean_change``: mean of (edited - unedited) score; ``mean_change_std`` the same
      divided by the std (ddof=1) of the unedited scores of these samples (NaN when that
      std is 0 or there is one sample);
    * for the binary attributes (those in ``thresholds``, each with its decision threshold,
      :func:`hmine.labelling.decision_thresholds`): ``flip_to_positive``, the fraction of
      samples scored negative (score <= threshold) before the edit that are positive after
      it, among those that were negative; ``flip_to_negative`` the reverse; and
      ``changed_decision``, the fraction of all edited samples whose decision differs from
      the unedited one. NaN for the other attributes.

    and per (direction, scale) the image quality of the edited images
    (:class:`hmine.quality.QualityMeter`: ``confident_share``, ``frechet_distance`` to the
    scale-0 images of the same samples; NaN where the labeller has no class heads or feature
    space).
    """
    from hmine.quality import QualityMeter

    zero = scales.index(0.0)
    quality = QualityMeter(labeller)
    rows = []
    for d, name in enumerate(names):
        # only the samples that have the direction (a per-image Jacobian direction exists for
        # the analysed samples alone); stores from before the "edited" array: all of them
        edited = np.asarray(group["edited"][d], dtype=bool) if "edited" in group else slice(None)
        images = [np.asarray(group["images"][d, s])[edited] for s in range(len(scales))]
        per_scale = [labeller.score(batch).reset_index(drop=True) for batch in images]
        quality.reference(images[zero])
        base = per_scale[zero]
        for s, scale in enumerate(scales):
            measured = quality.measure(images[s], per_scale[s])
            for attribute in per_scale[s].columns:
                before, after = base[attribute].to_numpy(), per_scale[s][attribute].to_numpy()
                rows.append({"direction": name, "scale": scale, "attribute": attribute,
                             **_changes(before, after, thresholds.get(attribute)), **measured})  # fmt: skip
    return pd.DataFrame(rows, columns=list(EFFECT_COLUMNS))


def _changes(before: np.ndarray, after: np.ndarray, threshold: float | None) -> dict:
    """One attribute's effect columns from its unedited and edited scores of the same samples."""
    change = float((after - before).mean())
    std = float(before.std(ddof=1)) if len(before) > 1 else float("nan")
    row = {
        "mean_score": float(after.mean()),
        "mean_change": change,
        "mean_change_std": change / std if std > 0 else float("nan"),
        "flip_to_positive": float("nan"),
        "flip_to_negative": float("nan"),
        "changed_decision": float("nan"),
    }
    if threshold is not None:
        negative, positive = before <= threshold, before > threshold
        if negative.any():
            row["flip_to_positive"] = float((after[negative] > threshold).mean())
        if positive.any():
            row["flip_to_negative"] = float((after[positive] <= threshold).mean())
        row["changed_decision"] = float(((after > threshold) != positive).mean())
    return row
