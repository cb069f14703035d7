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
:func:`hmine.regeneration.regenerate`, through the run's own sampler
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

**Bit identity.** torch's CPU kernels are chosen by the batch shape, so an image depends
on the batch size of the U-Net calls that made it, not on the other images in them. The
edit stage makes every call at one batch size (``edit.batch_size``, padding the last), and
so does :meth:`Run.edit`: it regenerates only the seed, all its scales in one call, and
gets the stage's bits. Scale 0 of a run's seed is its stored ``x0``.

Importing :mod:`hmine` does not import this module (nor torch): the names are loaded on
first use.
"""

from hmine.api.grid import image_grid
from hmine.api.model import Model, load_model
from hmine.api.run import Run, open_run
from hmine.api.terms import DirectionLike, Window

__all__ = ["Model", "Run", "image_grid", "load_model", "open_run", "DirectionLike", "Window"]
