"""hmine: mine interpretable directions in the h-space of diffusion models.

The pipeline runs from the command line (``hmine run configs/demo.yaml``); its results are
explored from Python with five names, walked through in ``docs/notebook.md``:

``open_run(path_or_config)``
    a run (``stores/demo``): ``run.samples``, ``run.labels``, ``run.directions``,
    ``run.effects``, ``run.status()``, ``run.edit(seed, direction, scales)``,
    ``run.sweep(seed, directions, scales)``;
``Run``
    what :func:`open_run` returns;
``load_model(model_id)``
    a model with sampler settings for work outside a run: ``model.sample(seeds)``,
    ``model.edit(seed, vector, scales)``;
``Model``
    what :func:`load_model` returns;
``image_grid(images)``
    images in [-1, 1] as one PIL image.

Example::

    import hmine
    run = hmine.open_run("stores/demo")
    hmine.image_grid(run.edit(3, "probe/is_red", [-20, 0, 20]), upscale=3)

They live in :mod:`hmine.api` and are imported on first use, so ``import hmine`` (and the
``hmine`` command) does not import torch.
"""

__version__ = "0.1.0"

_API = ("Model", "Run", "image_grid", "load_model", "open_run")

__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        import importlib

        return getattr(importlib.import_module("hmine.api"), name)
    raise AttributeError(f"module 'hmine' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
