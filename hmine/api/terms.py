"""Directions as weighted terms, their deltas, and the regeneration of edited images."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:  # imported lazily at run time: ``import hmine`` stays cheap
    import torch
    import xarray as xr

    from hmine.sampling import Sampler

from hmine.api.grid import _as_numpy


#: A direction for :meth:`Run.edit`: a name (``"probe/is_red"``, ``"jacobian/localised/0"``), a name
#: global at t or a combination written as in ``edit.directions`` (``"pca/1@t500"``,
#: ``"probe/is_red - 0.5*pca/0"``; :mod:`hmine.edit_names`),
#: a vector (numpy array, torch tensor or DataArray of shape (step, channel, y, x) or
#: (channel, y, x)), a dataset with ``direction`` and ``scale_unit`` (one direction of
#: ``run.directions``, used as it is), or a combination: a mapping name -> weight, or a
#: sequence of (direction, weight) pairs.
DirectionLike = Union[str, np.ndarray, "torch.Tensor", "xr.DataArray", "xr.Dataset", Mapping[str, float], Sequence[tuple]]

#: The steps an edit applies to: ``(t_min, t_max)``, the steps whose timestep t has
#: ``t_min <= t <= t_max``; either end may be None (open).
Window = tuple[Union[int, None], Union[int, None]]




# --------------------------------------------------------------------------------------
# directions as terms of a delta


@dataclass
class _Term:
    """One weighted direction of an edit: delta = sum of delta_for(unit, scale_unit, weight * scale)."""

    label: str
    unit: np.ndarray  # (step, channel, y, x), or (n_seeds, step, ...) for a per-image direction
    scale_unit: np.ndarray  # (step,), or (n_seeds, step)
    weight: float = 1.0
    has_direction: np.ndarray | None = None  # per-image: which of the run's seeds have it


def _delta(terms: list[_Term], scale: float, rows: list[int] | None) -> torch.Tensor:
    """delta_h at ``scale``; per-image terms give their rows ``rows`` (indices into the run's seeds)."""
    from hmine.editing import delta_for

    total = None
    for term in terms:
        unit, scale_unit = term.unit, term.scale_unit
        if term.has_direction is not None:
            unit, scale_unit = unit[rows], scale_unit[rows]
        delta = delta_for(unit, scale_unit, term.weight * float(scale))  # weight 1: the scale itself
        total = delta if total is None else total + delta
    return total


def _edited_images(
    sampler: Sampler,
    seed: int,
    rows: Callable[[list[int]], list[int] | None],
    terms: list[_Term],
    scales: list[float],
    window: Window,
    asymmetric: bool,
    batch_size: int,
    original: np.ndarray | None = None,
) -> np.ndarray:
    """(scale, color, height, width): ``seed`` regenerated with each scale's delta.

    The edit stage's computation (:func:`hmine.regeneration.regenerate` at the same U-Net
    ``batch_size``), so each image is the stage's bit for bit; scale 0 is ``original``
    (the stored ``x0``) when given. ``rows(seeds)`` maps seeds to the rows of per-image terms.
    """
    import torch

    from hmine.editing import edit_steps_from
    from hmine.regeneration import regenerate

    edit_steps = edit_steps_from(sampler.timesteps.tolist(), *window)
    images: dict[int, np.ndarray] = {}
    todo = [i for i, scale in enumerate(scales) if original is None or scale != 0.0]
    if todo:
        deltas = [_delta(terms, scales[i], rows([seed])) for i in todo]
        deltas = torch.stack([d[0] if d.ndim == 5 else d for d in deltas])  # (scale, step, channel, y, x)
        for done, edited in regenerate(
            sampler, [seed] * len(todo), deltas, range(len(todo)), edit_steps=edit_steps, asymmetric=asymmetric, batch_size=batch_size
        ):
            images.update({todo[r]: image for r, image in zip(done, edited)})
    return np.stack([images[i] if i in images else np.asarray(original, dtype=np.float32) for i in range(len(scales))])


def _images_array(images: np.ndarray, scales: list[float], attrs: dict) -> xr.DataArray:
    import xarray as xr

    return xr.DataArray(
        images,
        dims=("scale", "color", "height", "width"),
        coords={"scale": np.asarray(scales, dtype=np.float64)},
        name="edited",
        attrs={"units": "pixel value in [-1, 1]", **attrs},
    )


def _vector_values(vector: Any, steps: Sequence[int], h_shape: tuple[int, ...], what: str) -> np.ndarray:
    """A vector as float64 (step, channel, y, x): (channel, y, x) is repeated over the steps."""
    import xarray as xr

    if isinstance(vector, xr.DataArray):
        dims = ("step", "channel", "y", "x") if vector.ndim == 4 else ("channel", "y", "x")
        if set(vector.dims) != set(dims):
            raise ValueError(f"{what}: a DataArray direction needs dims {dims}, got {vector.dims}")
        if "step" in vector.dims and "step" in vector.coords and [int(t) for t in vector["step"].values] != list(steps):
            raise ValueError(f"{what}: its step coordinate {vector['step'].values.tolist()} is not the run's steps {list(steps)}")
        vector = vector.transpose(*dims)
    values = np.asarray(_as_numpy(vector), dtype=np.float64)
    if values.shape == tuple(h_shape):
        values = np.broadcast_to(values, (len(steps), *h_shape)).copy()
    if values.shape != (len(steps), *h_shape):
        raise ValueError(
            f"{what} has shape {values.shape}; a direction is (step, channel, y, x) = {(len(steps), *h_shape)} "
            f"or (channel, y, x) = {tuple(h_shape)} for every step"
        )
    return values


def _dataset_term(ds: xr.Dataset, weight: float, label: str | None) -> _Term:
    if "direction" not in ds or "scale_unit" not in ds:
        raise ValueError("a dataset direction needs the variables 'direction' and 'scale_unit' (one direction of run.directions)")
    if "direction" in ds["direction"].dims:
        raise ValueError("the dataset holds several directions; pick one, e.g. hmine.directions.direction_by_name(ds, name)")
    if label is None:
        label = str(ds["name"].values) if "name" in ds.coords else "vector"
    return _Term(label, ds["direction"].values, ds["scale_unit"].values, weight)


def _pairs(direction: Any) -> list[tuple[Any, float]] | None:
    """The (direction, weight) pairs of a combination, or None for a single direction."""
    if isinstance(direction, Mapping) and not hasattr(direction, "data_vars"):  # an xarray Dataset is a Mapping too
        return [(name, float(weight)) for name, weight in direction.items()]
    if isinstance(direction, (list, tuple)) and direction and all(
        isinstance(p, tuple) and len(p) == 2 and isinstance(p[1], (int, float, np.number)) for p in direction
    ):
        return [(d, float(w)) for d, w in direction]
    return None


def _describe(terms: list[_Term]) -> str:
    """``probe/is_red - 0.5*pca/0``: a row label for a combination."""
    text = ""
    for i, t in enumerate(terms):
        sign = "-" if t.weight < 0 else "+"
        size = "" if abs(t.weight) == 1.0 else f"{abs(t.weight):g}*"
        text += (("-" if sign == "-" else "") if i == 0 else f" {sign} ") + size + t.label
    return text


def _window(window: Window | None, default: Window) -> Window:
    if window is None:
        return default
    if not (isinstance(window, (tuple, list)) and len(window) == 2):
        raise ValueError(f"window must be (t_min, t_max), either end None for open, got {window!r}")
    low, high = (None if t is None else int(t) for t in window)
    if low is not None and high is not None and low > high:
        raise ValueError(f"window {window!r} is empty: t_min is above t_max")
    return low, high


def _scales(scales: float | Sequence[float]) -> list[float]:
    values = [float(scales)] if isinstance(scales, (int, float, np.number)) else [float(s) for s in scales]
    if not values:
        raise ValueError("scales is empty; give at least one scale, e.g. [-10, 0, 10]")
    return values


# --------------------------------------------------------------------------------------
# models outside a run
