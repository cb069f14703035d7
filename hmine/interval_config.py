"""How the edit stage chooses its editing interval and quality boosting automatically (Asyrp).

The settings of ``edit.interval``, read when ``edit.t_edit: auto`` or ``edit.t_boost`` is set
(:mod:`hmine.interval` has the rule and the boosting). This module imports only pydantic and
the standard library (the run config imports it).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_MAX_SAMPLES = 10_000_000  # hmine.config's bound (not imported: hmine.config imports this module)


class IntervalConfig(BaseModel):
    """Asyrp's rule for t_edit and t_boost, with a distance that needs no LPIPS weights.

    Asyrp (Kwon et al. 2023, ``set_t_edit_t_addnoise``) takes t_edit as the smallest t where
    LPIPS(x0, P_t) >= 0.33 cos(source, target text) and t_boost as the smallest t where
    LPIPS(x0, x_t) >= 1.2. hmine has no LPIPS weights offline, so its distance is the
    labeller's feature distance (``features``: the world classifier's penultimate features,
    CLIP's image embeddings) or the mean absolute pixel difference (``pixels``), divided by
    the mean distance between two different samples' x0: a *relative* distance, 1 = as far
    as another image of the model. The thresholds are in those units, not in LPIPS's: 0.33 is
    Asyrp's number (without its text factor) taken over, not calibrated; 0.2 puts t_boost at
    200 of 1000 on the embedded model's 10 steps (classifier features), near Asyrp's 167 on
    CelebA-HQ (docs/learned.md has the curves).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    distance: Literal["features", "pixels"] = Field(
        "features", description="the labeller's feature distance (classifier or CLIP features), or mean |pixel difference|"
    )
    edit_threshold: float = Field(
        0.33, gt=0, description="t_edit auto: the smallest timestep whose P_t is this far from x0 (relative distance)"
    )
    boost_threshold: float = Field(
        0.2, gt=0, description="t_boost auto: the smallest timestep whose x_t is this far from x0 (relative distance)"
    )
    n_samples: int = Field(32, ge=2, le=_MAX_SAMPLES, description="the run's first N samples measure the distances")
    boost_eta: float = Field(1.0, ge=0, le=1, description="eta of the boosted steps (t < t_boost; Asyrp: 1)")


def interval_in_use(edit) -> bool:
    """Whether an edit section's ``interval`` settings change its edits: with ``t_edit: auto``,
    with any ``t_boost``, or when set to other than the defaults (then hashed anyway)."""
    return edit.t_edit == "auto" or edit.t_boost is not None or edit.interval != IntervalConfig()
