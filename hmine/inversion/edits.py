"""Edits of inverted images with a directions store.

:func:`inversion_from_store` rebuilds an :class:`~hmine.inversion.Inversion` from rows of
``inversions.zarr``; :func:`edit_inverted` regenerates them with ``scale * scale_unit_t *
u_t`` added to h (hmine's scale convention, :func:`hmine.editing.delta_for`), optionally
with Asyrp's asymmetric step and the timestep window, through the plain loop of
:func:`hmine.inversion.regenerate_inverted`. Scale 0 gives the stored regenerated images back.

The edit stage (``edit.source: inversions``) computes the same images as rows of
:func:`hmine.regeneration.regenerate`, the engine it edits samples with, with
:class:`InvertedNoise` as the rows' trajectory source.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np
import torch

from hmine.inversion.regenerate import Inversion, regenerate_inverted_with_delta


def inversion_from_store(ds, indices: Sequence[int] | slice | None = None) -> Inversion:
    """The inversion of rows ``indices`` (all by default) of an opened ``inversions.zarr`` dataset."""
    rows = slice(None) if indices is None else indices
    part = ds.isel(sample=rows)

    def tensor(name):
        return torch.tensor(np.asarray(part[name].values, dtype=np.float32)) if name in part else None

    return Inversion(
        method=ds.attrs["hmine:method"],
        x_T=tensor("x_T"),
        z=tensor("z"),
        etas=json.loads(ds.attrs["hmine:etas"]),
        timesteps=torch.tensor(np.asarray(ds["step"].values, dtype=np.int64)),
        residual=tensor("residual"),
        images=tensor("x0"),
    )


class InvertedNoise:
    """The trajectory source of rows keyed by their index in ``inversion`` (:mod:`hmine.regeneration`).

    x_T, the per-step noise (z_t of an edit-friendly inversion; zeros for DDIM, whose steps
    have eta 0) and the residual added after the last step, as
    :func:`hmine.inversion.regenerate_inverted` uses them.
    """

    def __init__(self, sampler, inversion: Inversion):
        from hmine.inversion.regenerate import _check_timesteps

        _check_timesteps(sampler, inversion.timesteps)
        if [float(e) for e in inversion.etas] != [float(e) for e in sampler.etas]:
            raise ValueError(
                f"the inversion was made with etas {inversion.etas}, the sampler has {sampler.etas}; "
                "regenerate with the inversion's sampler (hmine.stages.invert.make_inversion_sampler)"
            )
        self.inversion = inversion

    def __call__(self, keys: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = torch.as_tensor([int(k) for k in keys], dtype=torch.long)
        x_T = self.inversion.x_T[rows]
        if self.inversion.z is None:
            return x_T, torch.zeros((len(self.inversion.etas), *x_T.shape), dtype=x_T.dtype)
        return x_T, self.inversion.z[rows].transpose(0, 1)  # (step, rows, ...) as the sampler's noise

    def residual(self, keys: Sequence[int]) -> torch.Tensor | None:
        if self.inversion.residual is None:
            return None
        return self.inversion.residual[torch.as_tensor([int(k) for k in keys], dtype=torch.long)]


def edit_inverted(
    sampler,
    inversion: Inversion,
    directions,
    name: str,
    scales: Sequence[float] | np.ndarray,
    *,
    t_edit: int | None = None,
    t_edit_max: int | None = None,
    asymmetric: bool = False,
) -> np.ndarray:
    """Images (scale, batch, 3, H, W) of an inverted batch edited along direction ``name``.

    Parameters
    ----------
    sampler : Sampler
        Of the inversion's model and steps (:func:`hmine.stages.invert.make_inversion_sampler`).
    inversion : Inversion
    directions : xarray.Dataset
        An opened ``directions.zarr`` (:func:`hmine.directions.open_directions`) of the same
        model, h position and number of steps.
    name : str
        The direction's name, e.g. ``probe/is_red``.
    scales : sequence of float, or ndarray of shape (scale, batch)
        Scales in std units of the data along the direction; a 2-d array gives every image
        its own scale (e.g. the sign that points to its far side).
    t_edit, t_edit_max, asymmetric
        As ``edit.t_edit``, ``edit.t_edit_max`` and ``edit.asymmetric``.
    """
    from hmine.directions import direction_by_name
    from hmine.editing import delta_for

    direction = direction_by_name(directions, name)
    steps = np.asarray(direction["step"].values)
    if not np.array_equal(steps, sampler.timesteps.numpy()):
        raise ValueError(
            f"direction {name!r} has steps {steps.tolist()}, the inversions {sampler.timesteps.tolist()}; "
            "use directions fitted with the same sample.num_inference_steps"
        )
    unit = np.asarray(direction["direction"].values, dtype=np.float32)
    scale_unit = np.asarray(direction["scale_unit"].values, dtype=np.float32)
    batch = inversion.x_T.shape[0]
    scales = np.asarray(scales, dtype=np.float64)
    out = []
    for row in scales if scales.ndim == 2 else scales[:, None].repeat(batch, axis=1):
        if np.all(row == 0) and inversion.images is not None:
            out.append(inversion.images.float().numpy())
            continue
        per_image = torch.stack([delta_for(unit, scale_unit, float(s)) for s in row])  # (batch, step, C, y, x)
        out.append(regenerate_inverted_with_delta(
            sampler, inversion, per_image, t_edit=t_edit, t_edit_max=t_edit_max, asymmetric=asymmetric
        ))
    return np.stack(out)


def edit_run_inversions(
    config,
    directions_path,
    name: str,
    scales: Sequence[float],
    *,
    n: int = 6,
    strip=None,
    asymmetric: bool | None = None,
) -> np.ndarray:
    """Edit the first ``n`` images of a run's ``inversions.zarr`` along ``name`` of a directions store.

    The edit settings (``t_edit``, ``t_edit_max`` and, unless given, ``asymmetric``) are the
    run's ``edit:`` section. With ``strip`` a PNG is written: rows are images, columns scales.
    Returns the images (scale, image, 3, H, W); scale 0 is the stored regenerated image.
    """
    import xarray as xr

    from hmine.directions import open_directions
    from hmine.editing import write_strip
    from hmine.stages.invert import inversions_path, make_inversion_sampler
    from hmine.stores import store_state

    path = inversions_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(f"{path} is not complete; run `hmine invert` with this config first")
    ds = xr.open_zarr(path, consolidated=False)
    inversion = inversion_from_store(ds, slice(0, n))
    images = edit_inverted(
        make_inversion_sampler(config), inversion, open_directions(directions_path), name, list(scales),
        t_edit=config.edit.t_edit, t_edit_max=config.edit.t_edit_max,
        asymmetric=config.edit.asymmetric if asymmetric is None else asymmetric,
    )
    if strip is not None:
        write_strip(images.transpose(1, 0, 2, 3, 4), strip, upscale=2)
    return images
