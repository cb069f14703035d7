"""The direction dataset (:class:`Direction`, :func:`build_direction_dataset`) and its zarr store.

The layout of the dataset and of ``directions.zarr`` is in the docs of
:mod:`hmine.directions`.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xarray as xr

from hmine.directions.plumbing import VECTOR_DIMS, _check_same_steps, _coords_for, _vector_values
from hmine.stores import COMPLETE

METHODS = ("pca", "pca_all", "mean_difference", "probe", "conditional", "regression", "learned", "prompt_pair")


@dataclass(frozen=True, eq=False)  # DataArray fields compare elementwise, not as a bool
class Direction:
    """One direction in the library's convention, ready for :func:`build_direction_dataset`.

    Parameters
    ----------
    name : str
        Unique, e.g. ``"pca/3"``, ``"probe/is_circle"``, ``"conditional/probe/is_circle|is_red"``.
    method : str
        One of :data:`METHODS`.
    unit : xarray.DataArray (step, channel, y, x)
        Unit vector at every step.
    scale_unit : xarray.DataArray (step,)
        Std of the data along ``unit`` per step.
    attribute : str, default=""
        The attribute of a supervised direction; "" for PCA.
    component : int, default=-1
        The PCA component index; -1 otherwise.
    explained_variance_ratio, probe_accuracy : xarray.DataArray (step,) or 0-d, float, or None
        Statistics; None where not applicable (stored as NaN), a scalar is repeated over steps.
    pca_angle_bound, pca_residual, pca_iterations : xarray.DataArray (step,) or 0-d, float, or None
        PCA only: the eigensolver's measured angle bound (degrees) and relative residual
        of this axis, and its Krylov blocks (data passes), per step (see
        :class:`StepwisePCA`); None otherwise.
    """

    name: str
    method: str
    unit: xr.DataArray
    scale_unit: xr.DataArray
    attribute: str = ""
    component: int = -1
    explained_variance_ratio: xr.DataArray | float | None = None
    probe_accuracy: xr.DataArray | float | None = None
    pca_angle_bound: xr.DataArray | float | None = None
    pca_residual: xr.DataArray | float | None = None
    pca_iterations: xr.DataArray | float | None = None


def _per_step(value, n_steps: int, what: str) -> np.ndarray:
    if value is None:
        return np.full(n_steps, np.nan)
    if isinstance(value, xr.DataArray):
        if value.ndim and value.dims != ("step",):
            raise ValueError(f"{what} must have dims ('step',) or none, got {value.dims}")
        value = value.values
    array = np.asarray(value, dtype=np.float64)
    if array.ndim == 1 and array.shape[0] != n_steps:
        raise ValueError(f"{what} has {array.shape[0]} values for {n_steps} steps")
    return np.broadcast_to(array, (n_steps,)).copy()


def build_direction_dataset(directions: Sequence[Direction]) -> xr.Dataset:
    """Stack directions into the store's :class:`xarray.Dataset` (layout in :mod:`hmine.directions`' docs)."""
    if not directions:
        raise ValueError("no directions to stack")
    names = [d.name for d in directions]
    duplicated = sorted({n for n in names if names.count(n) > 1})
    if duplicated:
        raise ValueError(f"direction names must be unique; repeated: {duplicated}")
    template = directions[0].unit.transpose(*VECTOR_DIMS)
    columns = _checked_columns(directions, template)

    # Variable-length strings (object dtype) are zarr v3's spec'd "string" type; fixed
    # width numpy unicode is written with an "unstable specification" warning.
    coords = {
        "name": ("direction", np.array(names, dtype=object)),
        "method": ("direction", np.array([d.method for d in directions], dtype=object)),
        "attribute": ("direction", np.array([d.attribute for d in directions], dtype=object)),
        "component": ("direction", np.array([d.component for d in directions], dtype=np.int64)),
    }
    coords.update(_coords_for(template, VECTOR_DIMS))
    return xr.Dataset(_data_variables(*columns), coords=coords)


def _checked_columns(directions: Sequence[Direction], template: xr.DataArray):
    """Each direction's unit vectors and per-step statistics, checked against ``template``.

    Returns the lists ``units``, ``scales``, ``ratios``, ``accuracies`` (one entry per
    direction) and the dict ``solver_stats`` of the PCA solver's per-step statistics.
    """
    n_steps = template.sizes["step"]
    units, scales, ratios, accuracies = [], [], [], []
    solver_stats = {"pca_angle_bound": [], "pca_residual": [], "pca_iterations": []}
    for d in directions:
        if d.method not in METHODS:
            raise ValueError(f"direction {d.name!r}: method {d.method!r} is not one of {METHODS}")
        _check_same_steps(template, d.unit, f"direction {d.name!r}")
        unit = _vector_values(d.unit, f"direction {d.name!r}")
        if unit.shape != template.shape:
            raise ValueError(f"direction {d.name!r} has shape {unit.shape}, expected {template.shape}")
        units.append(unit)
        scales.append(_per_step(d.scale_unit, n_steps, f"{d.name}: scale_unit"))
        ratios.append(_per_step(d.explained_variance_ratio, n_steps, f"{d.name}: explained_variance_ratio"))
        accuracies.append(_per_step(d.probe_accuracy, n_steps, f"{d.name}: probe_accuracy"))
        for key, values in solver_stats.items():
            values.append(_per_step(getattr(d, key), n_steps, f"{d.name}: {key}"))
    return units, scales, ratios, accuracies, solver_stats


def _data_variables(units: list, scales: list, ratios: list, accuracies: list, solver_stats: dict) -> dict:
    """The dataset's variables, with their descriptions, from :func:`_checked_columns`."""
    pair = ("direction", "step")
    return {
        "direction": (
            ("direction", *VECTOR_DIMS),
            np.stack(units),
            {"long_name": "unit direction per step", "units": "1"},
        ),
        "scale_unit": (
            pair,
            np.stack(scales),
            {
                "long_name": "std of the data projected on the unit direction; "
                "an edit at scale s adds s * scale_unit * direction"
            },
        ),
        "explained_variance_ratio": (
            pair,
            np.stack(ratios),
            {
                "long_name": "PCA explained variance ratio (of the step for pca, "
                "of the whole trajectory for pca_all); NaN otherwise"
            },
        ),
        "probe_accuracy": (
            pair,
            np.stack(accuracies),
            {"long_name": "held-out accuracy of the linear probe; NaN otherwise"},
        ),
        "pca_angle_bound": (
            pair,
            np.stack(solver_stats["pca_angle_bound"]),
            {
                "long_name": "PCA only: measured bound on the angle between the axis and the exact "
                "principal axis (of its degenerate cluster's subspace where eigenvalues tie); NaN otherwise",
                "units": "degree",
            },
        ),
        "pca_residual": (
            pair,
            np.stack(solver_stats["pca_residual"]),
            {
                "long_name": "PCA only: eigensolver residual |C v - lambda v| / lambda_1 of the axis, "
                "C the covariance; NaN otherwise"
            },
        ),
        "pca_iterations": (
            pair,
            np.stack(solver_stats["pca_iterations"]),
            {"long_name": "PCA only: block Krylov iterations (passes over the data) of the fit; NaN otherwise"},
        ),
    }


def direction_by_name(ds: xr.Dataset, name: str) -> xr.Dataset:
    """The one direction called ``name`` (dims without ``direction``).

    ``ds.sel(direction=...)`` does not work on the direction dataset (see :mod:`hmine.directions`' docs).
    """
    names = np.asarray(ds["name"].values).astype(str)
    hits = np.flatnonzero(names == name)
    if len(hits) != 1:
        raise KeyError(f"no direction named {name!r}; the dataset has {names.tolist()}")
    return ds.isel(direction=int(hits[0]))


class IncompleteStoreError(RuntimeError):
    """A directions store that lacks the ``hmine:complete`` mark (a crashed write)."""


def write_directions(ds: xr.Dataset, path) -> Path:
    """Write a direction dataset to a zarr v3 store at ``path``, atomically.

    The dataset goes to a sibling ``<name>.tmp`` folder; when every array is written the
    root gets ``hmine:complete = True``, and only then is the folder renamed into place
    (an existing store is moved aside first and deleted after). A reader therefore finds
    either no store, the old one, or the new complete one — never a half-written store
    that claims to be complete.

    Returns
    -------
    Path
        ``path``.
    """
    import zarr

    from hmine.stores import chunk_codecs

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)  # debris of an earlier crashed write
    path.parent.mkdir(parents=True, exist_ok=True)
    out = ds.drop_encoding()
    out.attrs = {k: v for k, v in ds.attrs.items() if k != COMPLETE}
    for name, variable in list(out.variables.items()):
        # Strings that came back from zarr as numpy StringDType (or fixed-width) are
        # rewritten as variable-length strings.
        if variable.dtype.kind in "UT":
            if name in out.coords:
                out = out.assign_coords({name: variable.astype(object)})
            else:
                out[name] = variable.astype(object)
    # Blosc and a CRC32C like every hmine store: damaged bytes fail on read, and the
    # chunk checks (stores.all_chunks_intact, stores.store_damage) find them
    encoding = {name: {"compressors": chunk_codecs()} for name in out.variables}
    if "direction" in out.variables:
        encoding["direction"]["chunks"] = (1, *out["direction"].shape[1:])  # one direction per chunk
    # every chunk is written, even one equal to the fill value, so that a missing chunk
    # file always means a lost one (stores.all_chunks_intact)
    out.to_zarr(tmp, mode="w", zarr_format=3, consolidated=False, encoding=encoding, write_empty_chunks=True)
    zarr.open_group(str(tmp), mode="r+").attrs[COMPLETE] = True
    if path.exists():
        old = path.with_name(f"{path.name}.old-{uuid.uuid4().hex[:8]}")
        path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old)
    else:
        tmp.rename(path)
    return path


def open_directions(path) -> xr.Dataset:
    """Open a complete directions store, loaded into memory.

    The store is small (a few directions of one h each). Loading it, and turning its
    string coordinates into fixed-width numpy unicode, makes boolean masks such as
    ``(ds["method"] == "probe").values`` and ``.astype(str)`` work as with any numpy
    array (a plain ``xr.open_zarr`` gives lazy numpy StringDType strings, which refuse
    ``.astype(str)``).

    Raises
    ------
    FileNotFoundError
        When there is no store at ``path``.
    IncompleteStoreError
        When the store lacks the ``hmine:complete`` mark.
    """
    import zarr

    path = Path(path)
    if not (path / "zarr.json").exists():
        raise FileNotFoundError(f"no directions store at {path}; run the directions stage (`hmine directions`)")
    if not zarr.open_group(str(path), mode="r").attrs.get(COMPLETE):
        raise IncompleteStoreError(
            f"{path} lacks the {COMPLETE} mark: its write did not finish; delete it and rerun the directions stage"
        )
    ds = xr.open_zarr(path, consolidated=False).load()
    # zarr v3 strings come back as numpy StringDType, which refuses ``.astype(str)``;
    # fixed-width unicode behaves like any numpy string array.
    for name, variable in list(ds.variables.items()):
        if variable.dtype.kind in "TO":
            text = np.array([str(v) for v in np.asarray(variable.values).ravel()], dtype=str)
            converted = variable.copy(data=text.reshape(variable.shape))
            if name in ds.coords:
                ds = ds.assign_coords({name: converted})
            else:
                ds[name] = converted
    return ds
