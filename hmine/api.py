"""hmine's notebook API: open a run, edit one image, sweep directions, sample outside a run.

Five names, exported from :mod:`hmine` itself (``docs/notebook.md`` walks through them on
the demo run):

=======================  ======================================================================
:func:`open_run`         a finished (or partial) run: its stores loaded lazily, its model,
                         sampler settings and scale convention
:class:`Run`             ``run.samples``, ``run.labels``, ``run.directions``, ``run.effects``,
                         ``run.edits``, ``run.status()``, ``run.edit(...)``, ``run.sweep(...)``
:func:`load_model`       a diffusion model with sampler settings, for work outside a run
:class:`Model`           ``model.sample(seeds)``, ``model.edit(seed, vector, scales)``
:func:`image_grid`       images in [-1, 1] (or uint8) as one PIL image
=======================  ======================================================================

Nothing here samples or edits on its own: :meth:`Run.edit` and :meth:`Model.edit` build
the delta with :func:`hmine.editing.delta_for` and regenerate with
:func:`hmine.editing.regenerate_with_delta`, through the run's own sampler
(:func:`hmine.stages.sample.make_sampler`), exactly as the edit stage does; and
:meth:`Model.sample` calls :meth:`hmine.sampling.Sampler.sample` as the sample stage does.
So ``run.edit(seed, name, [0])`` is the stored ``x0`` bit for bit, and ``run.edit`` at a
scale is the edit stage's image for the same (direction, scale, seed).

**Scale convention.** A direction is a unit vector ``u_t`` per step with ``scale_unit_t``,
the standard deviation of the run's data along it; an edit at scale ``s`` adds
``s * scale_unit_t * u_t`` to h at every step of the edit window. A vector you pass to
:meth:`Run.edit` is brought to that form with the run's h
(:func:`hmine.directions.normalise_direction`), so a scale of 1 is one standard deviation
of the data along it, as for every stored direction.

**Bit identity.** torch's CPU kernels round differently at different batch sizes, so the
edit stage regenerates the sample stage's whole batch of ``sample.batch_size`` seeds to
edit one of them, and so does :meth:`Run.edit` (``exact=True``, the default): one
regeneration of that batch per scale. ``exact=False`` regenerates only the seed, all scales
in one batch: much faster on a big batch, the same images up to the last bits.

Importing :mod:`hmine` does not import this module (nor torch): the names are loaded on
first use.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

import numpy as np

if TYPE_CHECKING:  # imported lazily at run time: ``import hmine`` stays cheap
    import pandas as pd
    import torch
    import xarray as xr
    from PIL import Image

    from hmine.config import RunConfig
    from hmine.hooks import HPosition
    from hmine.models import DiffusionModel
    from hmine.sampling import Sampler

__all__ = ["Model", "Run", "image_grid", "load_model", "open_run"]

#: A direction for :meth:`Run.edit`: a name (``"probe/is_red"``, ``"jacobian/localised/0"``),
#: a vector (numpy array, torch tensor or DataArray of shape (step, channel, y, x) or
#: (channel, y, x)), a dataset with ``direction`` and ``scale_unit`` (one direction of
#: ``run.directions``, used as it is), or a combination: a mapping name -> weight, or a
#: sequence of (direction, weight) pairs.
DirectionLike = Union[str, np.ndarray, "torch.Tensor", "xr.DataArray", "xr.Dataset", Mapping[str, float], Sequence[tuple]]

#: The steps an edit applies to: ``(t_min, t_max)``, the steps whose timestep t has
#: ``t_min <= t <= t_max``; either end may be None (open).
Window = tuple[Union[int, None], Union[int, None]]


# --------------------------------------------------------------------------------------
# images


def _as_numpy(images: Any) -> np.ndarray:
    if hasattr(images, "detach"):  # torch
        images = images.detach().float().cpu().numpy()
    return np.asarray(getattr(images, "values", images))


def _uint8(images: Any) -> np.ndarray:
    from hmine.imaging import to_uint8

    array = _as_numpy(images)
    return array if array.dtype == np.uint8 else to_uint8(array)


def _grid_canvas(cells: np.ndarray, pad: int) -> np.ndarray:
    """uint8 cells (rows, cols, 3, H, W) on a white canvas, ``pad`` pixels apart (H, W, 3)."""
    rows, cols, _, h, w = cells.shape
    canvas = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, 3), 255, np.uint8)
    for r in range(rows):
        for c in range(cols):
            y, x = pad + r * (h + pad), pad + c * (w + pad)
            canvas[y : y + h, x : x + w] = cells[r, c].transpose(1, 2, 0)
    return canvas


def image_grid(
    images: Any,
    columns: int | None = None,
    *,
    upscale: int = 1,
    pad: int = 2,
    row_labels: Sequence[str] | None = None,
    column_labels: Sequence[str] | None = None,
) -> Image.Image:
    """Images as one PIL image: a grid, optionally with row and column labels.

    Parameters
    ----------
    images : array-like
        Float images in [-1, 1] (as every hmine store holds them) or uint8, as a numpy
        array, torch tensor or DataArray of shape (3, H, W), (n, 3, H, W) or
        (rows, columns, 3, H, W). ``run.edit(...)`` (scale, color, height, width) gives
        one row, ``run.samples["x0"][:16]`` sixteen images.
    columns : int, optional
        For (n, 3, H, W): images per row (default: all of them in one row, at most 8).
    upscale : int, default=1
        Nearest-neighbour enlargement (the demo's images are 32 x 32).
    pad : int, default=2
        White pixels between images.
    row_labels, column_labels : sequence of str, optional
        Written left of each row and above each column.

    Returns
    -------
    PIL.Image.Image
        Shown as a picture by Jupyter; ``.save("grid.png")`` writes it.

    Examples
    --------
    >>> run = hmine.open_run("stores/demo")  # doctest: +SKIP
    >>> hmine.image_grid(run.samples["x0"][:16], columns=8, upscale=2)  # doctest: +SKIP
    >>> hmine.image_grid(run.edit(3, "probe/is_red", [-20, 0, 20]), upscale=3)  # doctest: +SKIP
    """
    from PIL import Image, ImageDraw, ImageFont

    cells = _uint8(images)
    if cells.ndim == 3:
        cells = cells[None, None]
    elif cells.ndim == 4:
        n = cells.shape[0]
        columns = columns or min(n, 8)
        rows = -(-n // columns)
        blank = np.full((rows * columns - n, *cells.shape[1:]), 255, np.uint8)
        cells = np.concatenate([cells, blank]).reshape(rows, columns, *cells.shape[1:])
    elif cells.ndim != 5:
        raise ValueError(f"images must have shape (3, H, W), (n, 3, H, W) or (rows, columns, 3, H, W), got {cells.shape}")
    if cells.shape[2] != 3:
        raise ValueError(f"images must have 3 color channels on the axis before (H, W), got shape {cells.shape}")
    rows, cols = cells.shape[:2]
    for labels, count, what in ((row_labels, rows, "row_labels"), (column_labels, cols, "column_labels")):
        if labels is not None and len(labels) != count:
            raise ValueError(f"{what} has {len(labels)} entries for {count} {what.split('_')[0]}s")
    image = Image.fromarray(_grid_canvas(cells, pad))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    if row_labels is None and column_labels is None:
        return image
    try:
        font = ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1: the bitmap font, one size
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(image)

    def size(text: str) -> tuple[int, int]:
        x0, y0, x1, y1 = draw.textbbox((0, 0), text, font=font)
        return x1 - x0, y1 - y0

    left = max((size(str(t))[0] for t in row_labels or []), default=0) + (8 if row_labels else 0)
    top = max((size(str(t))[1] for t in column_labels or []), default=0) + (6 if column_labels else 0)
    labelled = Image.new("RGB", (image.width + left, image.height + top), "white")
    labelled.paste(image, (left, top))
    draw = ImageDraw.Draw(labelled)
    (cell_h, cell_w), (h, w) = ((cells.shape[3] + pad) * upscale, (cells.shape[4] + pad) * upscale), cells.shape[3:]
    for r, text in enumerate(row_labels or []):  # left of the row, centred on it
        y = top + pad * upscale + r * cell_h + (h * upscale - size(str(text))[1]) // 2
        draw.text((4, y), str(text), fill="black", font=font)
    for c, text in enumerate(column_labels or []):  # above the column, centred on it
        x = left + pad * upscale + c * cell_w + (w * upscale - size(str(text))[0]) // 2
        draw.text((x, 2), str(text), fill="black", font=font)
    return labelled


def _scale_label(scale: float) -> str:
    return f"{scale:+g}" if scale else "0"


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
    batch: list[int],
    rows: Callable[[list[int]], list[int] | None],
    terms: list[_Term],
    scales: list[float],
    window: Window,
    asymmetric: bool,
    exact: bool,
) -> np.ndarray:
    """(scale, color, height, width): ``seed`` regenerated with each scale's delta.

    ``exact``: ``batch`` (which holds ``seed``) is regenerated whole once per scale, as the
    edit stage does; else ``seed`` alone, all scales in one batch. ``rows(seeds)`` maps
    seeds to the rows of the per-image terms.
    """
    from hmine.editing import regenerate_with_delta

    t_edit, t_edit_max = window
    if exact:
        position = batch.index(seed)
        images = []
        for scale in scales:
            # the same call as the edit stage: the sample stage's whole batch, one delta
            images.append(
                regenerate_with_delta(
                    sampler, batch, _delta(terms, scale, rows(batch)), t_edit=t_edit, t_edit_max=t_edit_max, asymmetric=asymmetric
                )[position]
            )
        return np.stack(images)
    import torch

    deltas = [_delta(terms, scale, rows([seed])) for scale in scales]
    stacked = torch.stack([d.reshape(d.shape[-4:]) for d in deltas])  # (scale, step, channel, y, x)
    return regenerate_with_delta(
        sampler, [seed] * len(scales), stacked, t_edit=t_edit, t_edit_max=t_edit_max, asymmetric=asymmetric
    )


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


class Model:
    """A diffusion model with its sampler settings: sample and edit outside a run.

    Made by :func:`load_model` (or ``run.model``, the run's own model and settings). It
    wraps a :class:`hmine.sampling.Sampler`, the sampler every stage uses.

    Attributes
    ----------
    sampler : hmine.sampling.Sampler
    diffusion_model : hmine.models.DiffusionModel
        The U-Net (``.unet``), scheduler and, for a latent model, the VQ decoder.
    timesteps : list of int
        The sampler's timesteps, first step first (the ``step`` coordinate of h).

    Examples
    --------
    >>> model = hmine.load_model("embedded:shapes-ddpm", num_inference_steps=10)  # doctest: +SKIP
    >>> q = model.sample([84, 85])                  # x0 (sample, color, height, width), h  # doctest: +SKIP
    >>> hmine.image_grid(q["x0"], upscale=3)                                                # doctest: +SKIP
    """

    def __init__(self, sampler: Sampler):
        self.sampler = sampler

    @property
    def diffusion_model(self) -> DiffusionModel:
        """The loaded :class:`hmine.models.DiffusionModel` (U-Net, scheduler, VQ decoder or None)."""
        return self.sampler.model

    @property
    def timesteps(self) -> list[int]:
        """The sampler's timesteps, first step first (the ``step`` coordinate of h)."""
        return [int(t) for t in self.sampler.timesteps]

    @functools.cached_property
    def h_shape(self) -> tuple[int, int, int]:
        """(channel, y, x) of h at the sampler's h position."""
        from hmine.hooks import h_shape

        return h_shape(self.sampler.model.unet, self.sampler.h_position)

    def __repr__(self) -> str:
        s = self.sampler
        return (
            f"Model({s.model.model_id!r}, {s.model.kind}, num_inference_steps={s.num_inference_steps}, "
            f"eta={s.etas[0] if len(set(s.etas)) == 1 else s.etas}, h_position={s.h_position!r})"
        )

    def sample(self, seeds: int | Sequence[int], *, record_h: bool = True) -> xr.Dataset:
        """Generate one image per seed in one batch, with h at every step.

        The sample stage's call (:meth:`hmine.sampling.Sampler.sample`): a batch of the
        run's ``sample.batch_size`` seeds gives that batch's stored ``x0`` and ``h``.

        Parameters
        ----------
        seeds : int or sequence of int
        record_h : bool, default=True
            Keep h (memory: steps x channel x y x x floats per seed).

        Returns
        -------
        xarray.Dataset
            ``x0`` (sample, color, height, width) in [-1, 1] and ``h``
            (sample, step, channel, y, x), with the coordinates of ``samples.zarr``
            (``sample``: seeds, ``step``: timesteps, ``step_index``).

        Examples
        --------
        >>> q = hmine.load_model("embedded:shapes-ddpm").sample(84)  # doctest: +SKIP
        >>> q["h"].sizes                                              # doctest: +SKIP
        Frozen({'sample': 1, 'step': 10, 'channel': 128, 'y': 8, 'x': 8})
        """
        import xarray as xr

        seeds = [int(seeds)] if isinstance(seeds, (int, np.integer)) else [int(s) for s in seeds]
        out = self.sampler.sample(seeds, record_h=record_h)
        data = {"x0": (("sample", "color", "height", "width"), out.images.float().cpu().numpy())}
        if record_h:
            data["h"] = (("sample", "step", "channel", "y", "x"), out.h.float().cpu().numpy())
        return xr.Dataset(
            data,
            coords={
                "sample": np.asarray(seeds, dtype=np.int64),
                "step": np.asarray(self.timesteps, dtype=np.int64),
                "step_index": ("step", np.arange(len(self.timesteps), dtype=np.int64)),
            },
            attrs={"hmine:model_id": self.sampler.model.model_id, "hmine:h_position": self.sampler.h_position},
        )

    def edit(
        self,
        seed: int,
        direction: Any,
        scales: float | Sequence[float],
        *,
        scale_unit: float | Sequence[float] = 1.0,
        window: Window | None = None,
        asymmetric: bool = False,
        batch: Sequence[int] | None = None,
    ) -> xr.DataArray:
        """Regenerate ``seed`` with ``scale * scale_unit * direction`` added to h, per scale.

        Outside a run there is no data to measure a standard deviation with: the
        direction is used as given (``run.edit`` normalises a vector with the run's h).

        Parameters
        ----------
        seed : int
        direction : array-like or xarray.Dataset
            A vector (step, channel, y, x), or (channel, y, x) for every step; or one
            direction of a run's ``directions`` (its ``direction`` and ``scale_unit``).
        scales : float or sequence of float
        scale_unit : float or sequence of float (one per step), default=1.0
            Ignored for a dataset direction, which carries its own.
        window : (t_min, t_max), optional
            Edit only the steps with t_min <= timestep <= t_max (None: open); every step
            by default.
        asymmetric : bool, default=False
            Asyrp's step: the edited eps in the predicted-x0 term only.
        batch : sequence of int, optional
            Seeds regenerated together with ``seed`` (it must be among them), one batch
            per scale: the images of ``model.sample(batch)`` bit for bit at scale 0. By
            default ``seed`` alone.

        Returns
        -------
        xarray.DataArray
            (scale, color, height, width), images in [-1, 1].

        Examples
        --------
        >>> model = hmine.load_model("embedded:shapes-ddpm")             # doctest: +SKIP
        >>> q = model.sample(range(8))                                    # doctest: +SKIP
        >>> v = q["h"][:4].mean("sample") - q["h"][4:].mean("sample")    # doctest: +SKIP
        >>> hmine.image_grid(model.edit(84, v, [-1, 0, 1]), upscale=3)   # doctest: +SKIP
        """
        import xarray as xr

        seed = int(seed)
        batch = [seed] if batch is None else [int(s) for s in batch]
        if seed not in batch:
            raise ValueError(f"batch {batch} does not hold seed {seed}")
        if isinstance(direction, xr.Dataset):
            term = _dataset_term(direction, 1.0, None)
        else:
            unit = _vector_values(direction, self.timesteps, self.h_shape, "direction")
            units = np.broadcast_to(np.asarray(scale_unit, dtype=np.float64), (len(self.timesteps),)).copy()
            term = _Term("vector", unit, units)
        scales = _scales(scales)
        window = _window(window, (None, None))
        images = _edited_images(self.sampler, seed, batch, lambda seeds: None, [term], scales, window, asymmetric, True)
        return _images_array(images, scales, {"seed": seed, "direction": term.label, "window": str(window), "asymmetric": int(asymmetric)})


def load_model(
    model_id: str = "embedded:shapes-ddpm",
    *,
    revision: str | None = None,
    device: str = "cpu",
    h_position: HPosition = "after",
    num_inference_steps: int = 10,
    eta: float | Sequence[float] = 0.0,
) -> Model:
    """Load a diffusion model with sampler settings, for sampling and editing outside a run.

    Parameters
    ----------
    model_id : str, default="embedded:shapes-ddpm"
        A hub id (``google/ddpm-ema-celebahq-256``, ``CompVis/ldm-celebahq-256``), a
        local folder in diffusers layout, or the model shipped with hmine (as
        ``model.id`` in a run config; :func:`hmine.models.load_model` loads it).
    revision : str, optional
        Hub revision; ignored for local folders.
    device : str, default="cpu"
    h_position : {"before", "middle", "after"}, default="after"
        Where h is read and edited: the input, middle or output of the U-Net's mid block.
    num_inference_steps : int, default=10
    eta : float or list of float, default=0.0
        0 is DDIM, 1 is DDPM-like; one per step as a list.

    Returns
    -------
    Model

    Examples
    --------
    >>> model = hmine.load_model("embedded:shapes-ddpm", h_position="after")  # doctest: +SKIP
    >>> q = model.sample(84)                                                   # doctest: +SKIP
    >>> hmine.image_grid(q["x0"], upscale=4)                                   # doctest: +SKIP
    """
    from hmine.models import load_model as load_diffusion_model
    from hmine.sampling import Sampler

    model = load_diffusion_model(model_id, revision=revision, device=device)
    return Model(Sampler(model, num_inference_steps=num_inference_steps, eta=eta, h_position=h_position))


# --------------------------------------------------------------------------------------
# runs


def _config_of(path_or_config: Any) -> RunConfig:
    from hmine.config import RunConfig, load_config
    from hmine.pipeline import read_run_config

    if isinstance(path_or_config, RunConfig):
        return path_or_config
    path = Path(path_or_config)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{path} has no config.json (a run started with `hmine run` or `hmine <stage>` writes one); "
                "pass the run's YAML config or a RunConfig to hmine.open_run instead"
            )
        config = read_run_config(path / "config.json")
        if config.run_dir.resolve() != path.resolve():  # the run was moved, or opened from elsewhere
            config = config.model_copy(update={"name": path.name, "output_root": path.parent})
        return config
    if not path.exists():
        raise FileNotFoundError(f"{path} is neither a run directory nor a config file")
    return read_run_config(path) if path.suffix == ".json" else load_config(path)


def open_run(path_or_config: str | Path | RunConfig) -> Run:
    """Open a run: its stores, loaded lazily, and its model, sampler and scale convention.

    Parameters
    ----------
    path_or_config : str, Path or RunConfig
        The run directory (``stores/demo``, whose ``config.json`` says how it was run), a
        YAML (or ``config.json``) run config, or a :class:`hmine.config.RunConfig`.

    Returns
    -------
    Run

    Raises
    ------
    FileNotFoundError
        No such directory or file, or a directory without ``config.json``.
    hmine.stores.StoreConfigMismatch
        The run's ``samples.zarr`` was sampled under another config.

    Examples
    --------
    >>> import hmine
    >>> run = hmine.open_run("stores/demo")                      # doctest: +SKIP
    >>> run.status()                                             # doctest: +SKIP
    >>> hmine.image_grid(run.edit(3, "probe/is_red", [-20, 0, 20]), upscale=3)  # doctest: +SKIP
    """
    from hmine.pipeline import check_run_dir

    config = _config_of(path_or_config)
    check_run_dir(config)  # samples of another config: nothing would replay them
    return Run(config)


class Run:
    """A mining run: its outputs, read lazily, and edits of its samples.

    Each store is read on first access and kept (open the run again after rerunning a
    stage). Edits use the run's model, sampler settings, edit window, step and scale
    convention, through the same library calls as the edit stage.

    Attributes
    ----------
    config : hmine.config.RunConfig
    path : Path
        The run directory.
    samples : xarray.Dataset
        ``samples.zarr``, lazily: ``h`` (sample, step, channel, y, x), ``x0``
        (sample, color, height, width); ``sample`` holds seeds, ``step`` timesteps.
    labels : pandas.DataFrame
        ``labels.parquet``: one row per seed (the index), one column per score.
    directions : xarray.Dataset
        ``directions.zarr`` in memory: ``direction`` (direction, step, channel, y, x) unit
        vectors, ``scale_unit`` (direction, step); coordinate ``name`` per direction.
    effects : pandas.DataFrame
        ``edit_effects.parquet``: one row per (direction, scale, attribute).
    edits : xarray.Dataset
        ``edits.zarr``, lazily: ``images`` (direction, scale, sample, color, height, width).
    model : Model
        The run's model and sampler (loaded on first use).

    Examples
    --------
    >>> run = hmine.open_run("stores/demo")                                    # doctest: +SKIP
    >>> run.labels["is_red"].gt(0.5).mean()                                    # doctest: +SKIP
    >>> run.sweep(3, ["probe/is_red", "probe/is_circle"], [-20, -10, 0, 10, 20])  # doctest: +SKIP
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.path = Path(config.run_dir)

    def __repr__(self) -> str:
        c = self.config
        return (
            f"Run({str(self.path)!r}: model {c.model.id!r}, {c.sample.n_samples} samples in batches of "
            f"{c.sample.batch_size}, {c.sample.num_inference_steps} steps, eta {c.sample.eta}, h {c.model.h_position} "
            f"the mid block; edits: window [{c.edit.t_edit}, {c.edit.t_edit_max}], asymmetric {c.edit.asymmetric})"
        )

    # ---- the stores

    def _existing(self, name: str, stage: str) -> Path:
        path = self.path / name
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist; run the {stage} stage (`hmine {stage} CONFIG`, or `hmine run`)")
        return path

    @functools.cached_property
    def samples(self) -> xr.Dataset:
        """``samples.zarr``, lazily: ``h`` (sample, step, channel, y, x), ``x0`` (sample, color, height, width)."""
        import xarray as xr

        return xr.open_zarr(self._existing("samples.zarr", "sample"), consolidated=False)

    @functools.cached_property
    def labels(self) -> pd.DataFrame:
        """``labels.parquet``: one row per seed (the index), one column per attribute score."""
        from hmine.stages.label import read_labels

        return read_labels(self.config)

    @functools.cached_property
    def directions(self) -> xr.Dataset:
        """``directions.zarr`` in memory: ``direction`` (direction, step, channel, y, x), ``scale_unit``, ``name``."""
        from hmine.directions import open_directions

        return open_directions(self._existing("directions.zarr", "directions"))

    @functools.cached_property
    def effects(self) -> pd.DataFrame:
        """``edit_effects.parquet``: one row per (direction, scale, attribute)."""
        from hmine.stages.edit import EFFECTS_TABLE, read_effects

        self._existing(EFFECTS_TABLE, "edit")
        return read_effects(self.path)

    @functools.cached_property
    def edits(self) -> xr.Dataset:
        """``edits.zarr``, lazily: ``images`` (direction, scale, sample, color, height, width)."""
        import xarray as xr

        return xr.open_zarr(self._existing("edits.zarr", "edit"), consolidated=False)

    @functools.cached_property
    def model(self) -> Model:
        """The run's model and sampler (``make_sampler(config)``, as every stage), loaded on first use."""
        from hmine.stages.sample import make_sampler

        return Model(make_sampler(self.config))

    @functools.cached_property
    def seeds(self) -> np.ndarray:
        """The run's seeds, in store order (the ``sample`` coordinate)."""
        return np.asarray(self.samples["sample"].values)

    @functools.cached_property
    def _jacobian(self):
        """The Jacobian stage's store (zarr group) when complete, else None."""
        from hmine.stages.jacobian import jacobian_path
        from hmine.stores import open_group, store_state

        path = jacobian_path(self.config)
        return open_group(path) if store_state(path) == "complete" else None

    @property
    def direction_names(self) -> list[str]:
        """Every direction :meth:`edit` takes by name: the stored ones, then the per-image
        Jacobian ones (``jacobian/<variant>/<k>``; ``@t<step>`` forms too) when the Jacobian
        stage is complete."""
        from hmine.per_image import JACOBIAN_PREFIX

        names = [str(n) for n in self.directions["name"].values] if (self.path / "directions.zarr").exists() else []
        group = self._jacobian
        if group is not None:
            for variant, array in (("masked", "vectors"), ("localised", "localised_vectors")):
                if array in group:
                    names += [f"{JACOBIAN_PREFIX}{variant}/{k}" for k in range(group[array].shape[2])]
        return names

    def status(self) -> pd.DataFrame:
        """Per stage: complete / partial / missing / stale / damaged, as ``hmine status`` says.

        Returns
        -------
        pandas.DataFrame
            Indexed by stage, columns ``state`` and ``detail``.

        Examples
        --------
        >>> hmine.open_run("stores/demo").status()  # doctest: +SKIP
                       state               detail
        stage
        sample      complete         samples.zarr
        ...
        """
        import pandas as pd

        from hmine.pipeline import stage_status

        rows = [(s.stage, s.state, s.detail) for s in stage_status(self.path, self.config)]
        return pd.DataFrame(rows, columns=["stage", "state", "detail"]).set_index("stage")

    # ---- edits

    def _terms(self, direction: Any, weight: float = 1.0, label: str | None = None) -> list[_Term]:
        import xarray as xr

        pairs = _pairs(direction)
        if pairs is not None:
            if weight != 1.0 or label is not None:
                raise ValueError("combinations cannot be nested")
            return [t for d, w in pairs for t in self._terms(d, w)]
        if isinstance(direction, str):
            return [self._named_term(direction, weight)]
        if isinstance(direction, xr.Dataset):
            return [_dataset_term(direction, weight, label)]
        from hmine.directions import normalise_direction

        # a vector: brought to the scale convention with the run's data, as every direction
        h = self.samples["h"]
        steps = [int(t) for t in h["step"].values]
        values = _vector_values(direction, steps, tuple(h.shape[2:]), "the direction vector")
        raw = xr.DataArray(values, dims=("step", "channel", "y", "x"), coords={"step": h["step"].values})
        unit, scale_unit = normalise_direction(raw, h)
        return [_Term(label or "vector", unit.values, scale_unit.values, weight)]

    def _named_term(self, name: str, weight: float) -> _Term:
        from hmine.directions import direction_by_name
        from hmine.per_image import JACOBIAN_PREFIX, JacobianDirection, per_image_units

        if name.startswith(JACOBIAN_PREFIX):
            group = self._jacobian
            if group is None:
                raise ValueError(
                    f"direction {name!r} is a per-image Jacobian direction, but {self.path / 'jacobian.zarr'} is not "
                    "complete; run the jacobian stage first"
                )
            JacobianDirection.parse(name).check_against(group)
            steps = [int(t) for t in self.samples["step"].values]
            units, scale_units, has = per_image_units(name, group, steps, self.samples["h"], self.seeds)
            return _Term(name, units, scale_units, weight, has)
        names = [str(n) for n in self.directions["name"].values]
        if name not in names:
            raise ValueError(f"no direction {name!r} in {self.path}; it has: {', '.join(self.direction_names)}")
        selected = direction_by_name(self.directions, name)
        # the edit stage's very arrays: unit (step, ...) and scale_unit (step,)
        return _Term(name, selected["direction"].values, selected["scale_unit"].values, weight)

    def _batch_of(self, seed: int) -> list[int]:
        """The sample stage's batch holding ``seed`` (the seed alone if it is not the run's)."""
        positions = np.flatnonzero(self.seeds == seed)
        if not len(positions):
            return [seed]
        size = self.config.sample.batch_size
        start = int(positions[0]) // size * size
        return [int(s) for s in self.seeds[start : start + size]]

    def _rows(self, terms: list[_Term], seed: int) -> Callable[[list[int]], list[int] | None]:
        per_image = [t for t in terms if t.has_direction is not None]
        if not per_image:
            return lambda seeds: None
        position = {int(s): i for i, s in enumerate(self.seeds)}
        if seed not in position:
            raise ValueError(f"seed {seed} is not a sample of {self.path}, so it has no per-image direction {per_image[0].label!r}")
        for term in per_image:
            if not term.has_direction[position[seed]]:
                analysed = [int(s) for s in self.seeds[term.has_direction]]
                raise ValueError(f"seed {seed} has no direction {term.label!r}: the Jacobian stage analysed the seeds {analysed}")
        return lambda seeds: [position[s] for s in seeds]

    def edit(
        self,
        seed: int,
        direction: DirectionLike,
        scales: float | Sequence[float],
        *,
        window: Window | None = None,
        asymmetric: bool | None = None,
        exact: bool = True,
    ) -> xr.DataArray:
        """One sample regenerated with a direction added to h, at each scale.

        An edit at scale ``s`` adds ``s * scale_unit_t * u_t`` to h at every step of the
        window (the scale convention: scale 1 is one standard deviation of the run's data
        along the direction). ``run.edit(seed, name, [0])`` is the stored ``x0`` of the
        seed bit for bit, and at any scale the image is the edit stage's for the same
        (direction, scale, seed).

        Parameters
        ----------
        seed : int
            A seed of the run (``run.seeds``); any other seed is sampled on its own.
        direction : str, vector, dataset or combination
            A name (``"probe/is_red"``, ``"pca/0"``, ``"jacobian/localised/0"``; see
            ``run.direction_names``); a vector (numpy, torch or DataArray) of shape
            (step, channel, y, x), or (channel, y, x) for every step, normalised per step
            with ``scale_unit`` measured on the run's h; one direction of
            ``run.directions`` (used as stored); or a weighted sum: a mapping
            ``{"probe/is_red": 1.0, "pca/0": -0.5}`` or a list of (direction, weight)
            pairs, whose delta at scale s is the sum of each direction's delta at
            ``weight * s``.
        scales : float or sequence of float
            In standard deviations of the data along the direction.
        window : (t_min, t_max), optional
            Edit only the steps whose timestep t has t_min <= t <= t_max (None: open end).
            Default: the run's ``edit.t_edit`` and ``edit.t_edit_max``; ``(None, None)``
            edits every step.
        asymmetric : bool, optional
            Asyrp's asymmetric step (the edited eps in the predicted-x0 term only).
            Default: the run's ``edit.asymmetric``.
        exact : bool, default=True
            Regenerate the seed's whole sample-stage batch once per scale, as the edit
            stage does (bit-identical to the stores). ``False``: the seed alone, every
            scale in one batch — ``sample.batch_size`` times fewer images, equal up to
            the last bits.

        Returns
        -------
        xarray.DataArray
            (scale, color, height, width), images in [-1, 1], in the order of ``scales``;
            attrs ``seed``, ``direction``, ``window``, ``asymmetric``. Show it with
            :func:`hmine.image_grid`.

        Raises
        ------
        ValueError
            A name the run does not have (the message lists those it has), a seed
            without the per-image direction, a vector of the wrong shape, or a window
            holding none of the sampler's timesteps.

        Examples
        --------
        >>> run = hmine.open_run("stores/demo")                                      # doctest: +SKIP
        >>> strip = run.edit(3, "probe/is_red", [-20, -10, 0, 10, 20])              # doctest: +SKIP
        >>> hmine.image_grid(strip, upscale=3)                                       # doctest: +SKIP
        >>> run.edit(3, {"probe/is_red": 1.0, "pca/0": -0.5}, [10], window=(500, None))  # doctest: +SKIP
        """
        seed = int(seed)
        terms = self._terms(direction)
        scales = _scales(scales)
        edit = self.config.edit
        window = _window(window, (edit.t_edit, edit.t_edit_max))
        asymmetric = edit.asymmetric if asymmetric is None else bool(asymmetric)
        rows = self._rows(terms, seed)
        images = _edited_images(self.model.sampler, seed, self._batch_of(seed), rows, terms, scales, window, asymmetric, exact)
        attrs = {"seed": seed, "direction": _describe(terms), "window": str(window), "asymmetric": int(asymmetric)}
        return _images_array(images, scales, attrs)

    def sweep(
        self,
        seed: int,
        directions: Sequence[DirectionLike],
        scales: Sequence[float],
        *,
        labels: Sequence[str] | None = None,
        window: Window | None = None,
        asymmetric: bool | None = None,
        exact: bool = True,
        upscale: int = 3,
    ) -> Image.Image:
        """The direction plotter: one seed edited along several directions at several scales.

        Rows are directions, columns scales, each image :meth:`edit`'s; rows are labelled
        with the direction, columns with the scale.

        Parameters
        ----------
        seed : int
        directions : sequence of direction
            Anything :meth:`edit` takes, one per row.
        scales : sequence of float
        labels : sequence of str, optional
            Row labels (default: the names; "vector" for vectors).
        window, asymmetric, exact
            As for :meth:`edit`.
        upscale : int, default=3
            Nearest-neighbour enlargement of every image.

        Returns
        -------
        PIL.Image.Image

        Examples
        --------
        >>> run = hmine.open_run("stores/demo")                                               # doctest: +SKIP
        >>> run.sweep(3, ["probe/is_red", "probe/is_circle", "pca/0"], [-20, -10, 0, 10, 20])  # doctest: +SKIP
        >>> _.save("sweep.png")                                                                # doctest: +SKIP
        """
        if isinstance(directions, (str, Mapping)):
            directions = [directions]
        scales = _scales(scales)
        rows = [self.edit(seed, d, scales, window=window, asymmetric=asymmetric, exact=exact) for d in directions]
        row_labels = list(labels) if labels is not None else [r.attrs["direction"] for r in rows]
        grid = np.stack([r.values for r in rows])
        return image_grid(grid, upscale=upscale, row_labels=row_labels, column_labels=[_scale_label(s) for s in scales])
