"""A model with its sampler settings, for work outside a run (:func:`load_model`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # imported lazily at run time: ``import hmine`` stays cheap
    import xarray as xr

    from hmine.hooks import HPosition
    from hmine.models import DiffusionModel
    from hmine.sampling import Sampler

from hmine.api.terms import Window, _Term, _dataset_term, _edited_images, _images_array, _scales, _vector_values, _window


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
        coords = {
            "sample": np.asarray(seeds, dtype=np.int64),
            "step": np.asarray(self.timesteps, dtype=np.int64),
            "step_index": ("step", np.arange(len(self.timesteps), dtype=np.int64)),
        }
        if out.prompts is not None:  # a text-conditional model: each sample's prompt, as samples.zarr
            coords["prompt"] = ("sample", np.asarray(out.prompts, dtype=object))
        return xr.Dataset(
            data,
            coords=coords,
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
        batch_size: int = 64,
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
        batch_size : int, default=64
            The U-Net batch size (the rows of every call are padded to it): the images
            are a run's edit-stage images bit for bit when it is the run's ``edit.batch_size``.

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
        if isinstance(direction, xr.Dataset):
            term = _dataset_term(direction, 1.0, None)
        else:
            unit = _vector_values(direction, self.timesteps, self.h_shape, "direction")
            units = np.broadcast_to(np.asarray(scale_unit, dtype=np.float64), (len(self.timesteps),)).copy()
            term = _Term("vector", unit, units)
        scales = _scales(scales)
        window = _window(window, (None, None))
        images = _edited_images(self.sampler, seed, lambda seeds: None, [term], scales, window, asymmetric, int(batch_size))
        return _images_array(images, scales, {"seed": seed, "direction": term.label, "window": str(window), "asymmetric": int(asymmetric)})


def load_model(
    model_id: str = "embedded:shapes-ddpm",
    *,
    revision: str | None = None,
    device: str = "cpu",
    h_position: HPosition = "after",
    num_inference_steps: int = 10,
    eta: float | Sequence[float] = 0.0,
    text: Any = None,
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
    text : hmine.prompts.TextConfig or dict, optional
        The prompts and guidance of a text-conditional model (as ``sample.text`` in a run
        config: ``prompts`` or ``template`` with ``slots``, ``guidance_scale``, ...); needed
        for one (the embedded ``hmine/embedded/shapes-text-ddpm``, a Stable Diffusion
        folder), refused for any other. Seed s gets the prompt ``text.prompt_for(s)``.

    Returns
    -------
    Model

    Examples
    --------
    >>> model = hmine.load_model("embedded:shapes-ddpm", h_position="after")  # doctest: +SKIP
    >>> q = model.sample(84)                                                   # doctest: +SKIP
    >>> hmine.image_grid(q["x0"], upscale=4)                                   # doctest: +SKIP
    >>> text = {"template": "a {color} circle", "slots": {"color": ["red", "blue"]}, "guidance_scale": 4}
    >>> model = hmine.load_model("embedded:shapes-text-ddpm", text=text)       # doctest: +SKIP
    >>> model.sample([0, 1])["prompt"].values                                  # doctest: +SKIP
    array(['a red circle', 'a blue circle'], dtype=object)
    """
    from hmine.models import load_model as load_diffusion_model
    from hmine.prompts import TextConfig
    from hmine.sampling import Sampler

    if text is not None and not isinstance(text, TextConfig):
        text = TextConfig.model_validate(text)
    model = load_diffusion_model(model_id, revision=revision, device=device)
    return Model(Sampler(model, num_inference_steps=num_inference_steps, eta=eta, h_position=h_position, text=text))


# --------------------------------------------------------------------------------------
# runs
