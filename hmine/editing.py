"""Edits in h-space: deltas from unit directions and scales, and their application.

The scale convention is the one of :mod:`hmine.directions`: a direction is stored as a
unit vector per step ``u_t`` with ``scale_unit_t``, the standard deviation of the data
projected on ``u_t``. An edit at scale ``s`` adds ``s * scale_unit_t * u_t`` to h at every
edited step, so a scale of 1 moves h by one standard deviation of the data along the
direction, whichever method found it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from hmine.imaging import write_image_grid
from hmine.sampling import Sampler


def edit_steps_from(
    timesteps: Sequence[int], t_edit: int | None, t_edit_max: int | None = None, section: str = "edit"
) -> list[bool]:
    """Which steps are edited: those with ``t_edit <= timestep <= t_edit_max`` (an unset end is open).

    ``section`` is the config section the window comes from, which the error names.

    Raises
    ------
    ValueError
        When the window holds none of ``timesteps``: such an edit would silently change nothing.
    """
    if t_edit == "auto":
        raise ValueError(
            "t_edit 'auto' is chosen by the edit stage (hmine.interval.resolve_interval); give this edit a number of a timestep"
        )
    edited = [
        (t_edit is None or int(t) >= t_edit) and (t_edit_max is None or int(t) <= t_edit_max) for t in timesteps
    ]
    if not any(edited):
        raise ValueError(
            f"the edit window t_edit={t_edit}, t_edit_max={t_edit_max} holds none of the sampler's "
            f"timesteps {[int(t) for t in timesteps]}; widen {section}.t_edit / {section}.t_edit_max"
        )
    return edited


def delta_for(unit: np.ndarray, scale_unit: np.ndarray, scale: float) -> torch.Tensor:
    """delta_h = scale * scale_unit * unit, the scale units broadcast over (channel, y, x).

    ``unit`` (step, channel, y, x) with ``scale_unit`` (step,) gives one delta for every
    sample; ``unit`` (sample, step, channel, y, x) with ``scale_unit`` (sample, step) gives
    each sample its own (per-image directions).
    """
    unit = np.asarray(unit, dtype=np.float32)
    scale_unit = np.asarray(scale_unit, dtype=np.float32)
    scale_unit = scale_unit.reshape(*scale_unit.shape, *([1] * (unit.ndim - scale_unit.ndim)))
    return torch.from_numpy(float(scale) * scale_unit * unit)


def regenerate_with_delta(
    sampler: Sampler,
    seeds: Sequence[int],
    delta_h: torch.Tensor,
    *,
    t_edit: int | None = None,
    t_edit_max: int | None = None,
    asymmetric: bool = False,
) -> np.ndarray:
    """Regenerate ``seeds`` with ``delta_h`` (step, C, H, W) or (batch, step, C, H, W); images as numpy.

    Only the steps whose timestep lies in [``t_edit``, ``t_edit_max``] get their delta
    (:func:`edit_steps_from`); the others run unedited.
    """
    out = sampler.sample(
        list(seeds),
        delta_h=delta_h,
        edit_steps=edit_steps_from(sampler.timesteps.tolist(), t_edit, t_edit_max),
        asymmetric=asymmetric,
        record_h=False,
    )
    return out.images.float().cpu().numpy()


def write_strip(images: np.ndarray, path, *, upscale: int = 1) -> None:
    """Save images (rows, columns, 3, H, W) in [-1, 1] as one PNG: rows are samples, columns scales."""
    rows, cols = images.shape[:2]
    write_image_grid(images.reshape(rows * cols, *images.shape[2:]), path, columns=cols, upscale=upscale)
