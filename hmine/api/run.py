"""A run directory opened for interactive study (:func:`open_run`)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported lazily at run time: ``import hmine`` stays cheap
    import pandas as pd
    import xarray as xr
    from PIL import Image

    from hmine.config import RunConfig

from hmine.api.grid import _scale_label, image_grid
from hmine.api.model import Model
from hmine.api.terms import (
    DirectionLike,
    Window,
    _dataset_term,
    _describe,
    _edited_images,
    _images_array,
    _pairs,
    _scales,
    _Term,
    _vector_values,
    _window,
)


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
            return self._text_terms(direction, weight)
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

    def _text_terms(self, text: str, weight: float) -> list[_Term]:
        """A name, a name global at t (``pca/1@t500``) or a combination (``probe/is_red - 0.5*pca/0``),
        as ``edit.directions`` writes them (:mod:`hmine.edit_names`)."""
        from hmine.combined_edits import at_step
        from hmine.edit_names import is_plain, parse_edit

        if is_plain(text):
            return [self._named_term(text, weight)]
        terms = []
        for term in parse_edit(text):
            named = self._named_term(term.name, weight * term.weight)
            if term.at_step is not None:
                named.unit, named.scale_unit = at_step(term, named.unit, named.scale_unit, self.samples["step"].values.tolist())
                named.label = f"{term.name}@t{term.at_step}"
            terms.append(named)
        return terms

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

    def _edit_batch_size(self) -> int:
        """The edit stage's U-Net batch size: its store's, else the config's (64 for ``"auto"``)."""
        from hmine.stages.edit import UNET_BATCH_SIZE

        from hmine.stores import open_group

        path = self.path / "edits.zarr"
        recorded = open_group(path).attrs.get(UNET_BATCH_SIZE) if (path / "zarr.json").exists() else None
        if recorded is not None:
            return int(recorded)
        setting = self.config.edit.batch_size
        return 64 if setting == "auto" else int(setting)

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
        positions = np.flatnonzero(self.seeds == seed)
        original = self.samples["x0"].values[positions[0]] if len(positions) else None  # scale 0: the stored image
        images = _edited_images(
            self.model.sampler, seed, rows, terms, scales, window, asymmetric, self._edit_batch_size(), original
        )
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
        window, asymmetric
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
        rows = [self.edit(seed, d, scales, window=window, asymmetric=asymmetric) for d in directions]
        row_labels = list(labels) if labels is not None else [r.attrs["direction"] for r in rows]
        grid = np.stack([r.values for r in rows])
        return image_grid(grid, upscale=upscale, row_labels=row_labels, column_labels=[_scale_label(s) for s in scales])
