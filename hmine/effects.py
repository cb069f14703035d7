"""What an edit changes: attribute scores of edited images against the unedited ones.

For each (direction, scale, attribute): the mean score of the edited images, its mean
change against the scale-0 images (the unedited regeneration of the same seeds), and for
binary attributes the share of samples whose decision (score > threshold) flipped — the
analogue of Haas et al. Table I (diagonal: the intended effect; off-diagonal: leakage).
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def measure_effects(group, names, scales, labeller, thresholds: dict[str, float]) -> pd.DataFrame:
    """Per (direction, scale, attribute): mean score, mean change and decision flips.

    Changes are measured against the scale-0 images of the same direction (the unedited
    regeneration), sample by sample. For the binary attributes, ``flip_to_positive`` is
    the fraction of samples scored negative (score <= threshold) before the edit that
    are positive after it, among those that were negative; ``flip_to_negative`` the reverse.
    ``thresholds`` maps each binary attribute to its decision threshold
    (:func:`hmine.labelling.decision_thresholds`).
    """
    zero = scales.index(0.0)
    rows = []
    for d, name in enumerate(names):
        # only the samples that have the direction (a per-image Jacobian direction exists for
        # the analysed samples alone); stores from before the "edited" array: all of them
        edited = np.asarray(group["edited"][d], dtype=bool) if "edited" in group else slice(None)
        per_scale = [
            labeller.score(np.asarray(group["images"][d, s])[edited]).reset_index(drop=True) for s in range(len(scales))
        ]
        base = per_scale[zero]
        for s, scale in enumerate(scales):
            scores = per_scale[s]
            for attribute in scores.columns:
                before, after = base[attribute].to_numpy(), scores[attribute].to_numpy()
                row = {
                    "direction": name,
                    "scale": scale,
                    "attribute": attribute,
                    "mean_score": float(after.mean()),
                    "mean_change": float((after - before).mean()),
                    "flip_to_positive": float("nan"),
                    "flip_to_negative": float("nan"),
                }
                if attribute in thresholds:
                    threshold = thresholds[attribute]
                    negative, positive = before <= threshold, before > threshold
                    if negative.any():
                        row["flip_to_positive"] = float((after[negative] > threshold).mean())
                    if positive.any():
                        row["flip_to_negative"] = float((after[positive] <= threshold).mean())
                rows.append(row)
    return pd.DataFrame(rows)
