"""Invert stage: the images of ``images:`` inverted into the sampler's trajectories, batch by batch, in ``inversions.zarr``.

Only a config with an ``images:`` section has anything to invert; without one the stage
writes nothing and returns at once.

Layout (``xr.open_zarr(run_dir / "inversions.zarr", consolidated=False)``); ``h`` has the
schema of ``samples.zarr``:

======================  ==============================  =========================================
variable                dims                            meaning
======================  ==============================  =========================================
``h``                   (sample, step, channel, y, x)   h at every step of the regenerated trajectory
``x0``                  (sample, color, height, width)  the regenerated image (scale 0 of every edit)
``input``               (sample, color, height, width)  the image as read (cropped, resized), [-1, 1]
``x_T``                 (sample, latent, lh, lw)        the sampler's start (sampler space)
``z``                   (sample, step, latent, lh, lw)  edit_friendly: the noise of every step
``residual``            (sample, latent, lh, lw)        edit_friendly: added after the last step
``reconstruction_error``  (sample,)                     max |x0 - input|, [-1, 1] pixel units
``target_error``        (sample,)                       max |x0 - decode(encode(input))|
``psnr``                (sample,)                       PSNR of x0 against input (dB, peak-to-peak 2)
``labels``              (sample, attribute)             the given labels (label file, world factors)
``done``                (sample,)                       True once the image's batch is written
======================  ==============================  =========================================

Coordinates: ``sample`` holds the image ids, ``step`` the timesteps, ``step_index`` the
loop index, ``attribute`` the label names. Attributes: ``hmine:method``, ``hmine:etas``
(JSON), ``hmine:skipped_images`` (JSON list of ``{id, reason}``). Resumable like
``samples.zarr``: one chunk row per batch, data first, done-mark second, complete mark
last, every chunk checksummed; a damaged batch is redone.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from hmine.chunk_checks import CHUNK_CHECKED_ARRAYS, damaged_batches, verify_done_chunks
from hmine.config import RunConfig
from hmine.stages.sample import StageResult, progress
from hmine.stores import (
    COMPLETE,
    ArraySpec,
    batch_region,
    done_batches,
    mark_complete,
    open_group,
    prepare_store,
    provenance_attrs,
    store_state,
)

logger = logging.getLogger(__name__)

INVERSIONS_STORE = "inversions.zarr"
#: Arrays whose chunks every done batch writes (never all fill values), checked on rerun.
CHECKED_ARRAYS = CHUNK_CHECKED_ARRAYS[INVERSIONS_STORE]


def inversions_path(config: RunConfig) -> Path:
    return config.run_dir / INVERSIONS_STORE


def damaged_inversion_batches(path: Path) -> list[int]:
    """Batches marked done in a complete ``inversions.zarr`` whose chunks are lost or damaged (read-only)."""
    if store_state(path) != "complete":
        return []
    group = open_group(path)
    return damaged_batches(group, path, CHECKED_ARRAYS, group["done"].chunks[0])


def make_inversion_sampler(config: RunConfig, model=None):
    """The sampler of the run's inversions: the sample stage's steps, h position and threads,
    eta ``invert.eta`` (edit_friendly) or 0 (ddim)."""
    from hmine.models import load_model
    from hmine.sampling import Sampler

    if model is None:
        model = load_model(config.model.id, revision=config.model.revision, device=config.model.device)
    return Sampler(
        model,
        num_inference_steps=config.sample.num_inference_steps,
        eta=config.invert.eta if config.invert.method == "edit_friendly" else 0.0,
        h_position=config.model.h_position,
        torch_threads=config.sample.torch_threads,
    )


def image_size(model) -> tuple[int, int]:
    """(height, width) of the images a model makes (a latent model's decoder upsamples)."""
    from hmine.stages.sample import _image_shape

    return tuple(_image_shape(model)[1:])


def _template(config: RunConfig, source, sampler, identity: str) -> tuple[list, dict, dict]:
    from hmine.hooks import h_shape as find_h_shape
    from hmine.stages import identity_record

    model = sampler.model
    n, steps, b = len(source), sampler.num_inference_steps, config.invert.batch_size
    h_shape = find_h_shape(model.unet, config.model.h_position)
    latent = tuple(model.sample_shape)
    image = (3, *source.size)
    edit_friendly = config.invert.method == "edit_friendly"

    def per_sample(name, shape, dims, attrs, dtype="float32"):
        return ArraySpec(name, (n, *shape), (b, *shape), dtype, ("sample", *dims), attrs)

    arrays = [
        ArraySpec(
            "h", (n, steps, *h_shape), (b, 1, *h_shape), config.invert.h_dtype, ("sample", "step", "channel", "y", "x"),
            {"long_name": f"U-Net h-space activations ({config.model.h_position} the mid block)", "units": "1",
             "coordinates": "step_index"},
        ),
        per_sample("x0", image, ("color", "height", "width"), {"long_name": "regenerated image", "units": "pixel value in [-1, 1]"}),
        per_sample("input", image, ("color", "height", "width"), {"long_name": "input image", "units": "pixel value in [-1, 1]"}),
        per_sample("x_T", latent, ("latent", "lh", "lw"), {"long_name": "x_T, the sampler's start", "units": "1"}),
        per_sample("reconstruction_error", (), (), {"long_name": "max |x0 - input|", "units": "pixel value"}),
        per_sample("target_error", (), (), {"long_name": "max |x0 - decode(encode(input))|", "units": "pixel value"}),
        per_sample("psnr", (), (), {"long_name": "PSNR of x0 against input", "units": "dB"}),
        ArraySpec("done", (n,), (b,), "bool", ("sample",), {"long_name": "batch written"}, False, False),
        ArraySpec("sample", (n,), (n,), "str", ("sample",), {"long_name": "image id"}, None, False),
        ArraySpec("step", (steps,), (steps,), "int64", ("step",), {"long_name": "scheduler timestep"}, None, False),
        ArraySpec("step_index", (steps,), (steps,), "int64", ("step",), {"long_name": "denoising step index"}, None, False),
    ]
    if edit_friendly:
        arrays += [
            ArraySpec("z", (n, steps, *latent), (b, 1, *latent), "float32", ("sample", "step", "latent", "lh", "lw"),
                      {"long_name": "noise of every step (edit-friendly)", "units": "1", "coordinates": "step_index"}),
            per_sample("residual", latent, ("latent", "lh", "lw"), {"long_name": "added after the last step", "units": "1"}),
        ]
    coords = {
        "sample": np.asarray(source.ids, dtype=str),
        "step": sampler.timesteps.numpy().astype(np.int64),
        "step_index": np.arange(steps, dtype=np.int64),
    }
    if source.labels is not None:
        names = [str(c) for c in source.labels.columns]
        arrays += [
            ArraySpec("labels", (n, len(names)), (b, len(names)), "float32", ("sample", "attribute"),
                      {"long_name": "given labels of the images", "units": "1"}),
            ArraySpec("attribute", (len(names),), (len(names),), "str", ("attribute",), {"long_name": "label"}, None, False),
        ]
        coords["attribute"] = np.asarray(names, dtype=str)
    attrs = provenance_attrs(
        config.stage_inputs("invert"),
        identity,
        {
            "hmine:model_id": config.model.id,
            "hmine:model_revision": config.model.revision or "",
            "hmine:h_position": config.model.h_position,
            "hmine:method": config.invert.method,
            "hmine:etas": json.dumps(sampler.etas if edit_friendly else [0.0] * steps),
            "hmine:num_inference_steps": steps,
            "hmine:skipped_images": json.dumps(source.skipped),
            **identity_record(config, "invert"),
        },
    )
    return arrays, attrs, coords


def run_invert_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Invert every image of ``config.images`` into ``inversions.zarr``, resuming if partial.

    Without an ``images:`` section there is nothing to invert: nothing is written.
    """
    import torch

    from hmine.image_sources import open_image_source
    from hmine.inversion import invert, psnr
    from hmine.stages import input_identity, up_to_date

    started = time.perf_counter()
    path = inversions_path(config)
    if config.images is None:
        logger.info("invert stage: the config has no images: section, nothing to invert")
        return StageResult(path, 0, 0, 0, 0, 0.0)
    b = config.invert.batch_size
    if up_to_date(config, "invert"):
        n_batches = -(-open_group(path)["done"].shape[0] // b)
        logger.info("invert stage: %s is complete, nothing to do", path)
        return StageResult(path, n_batches, 0, n_batches, 0, time.perf_counter() - started)
    identity = input_identity(config, "invert")
    sampler = make_inversion_sampler(config, model)
    source = open_image_source(config.images, image_size(sampler.model))
    arrays, attrs, coords = _template(config, source, sampler, identity)
    # another identity (config, images, labels) makes a new store: the old one is stale
    group = prepare_store(path, arrays, attrs, coords, replace_stale=True)
    repaired = verify_done_chunks(group, path, CHECKED_ARRAYS, b)
    if repaired:
        logger.warning("invert stage: batches %s had damaged chunks and will be redone", repaired)
    n = len(source)
    n_batches = -(-n // b)
    todo = [i for i, done in enumerate(done_batches(group, b)) if not done]
    for batch in progress(todo, "invert", "batch", show_progress):
        region = batch_region(batch, b, n)
        images = torch.from_numpy(source.load(range(region.start, region.stop)))
        seeds = [config.invert.seed_start + k for k in range(region.start, region.stop)]
        result = invert(sampler, images, config.invert.method, seeds=seeds, eta=config.invert.eta, refine=config.invert.refine)
        # data first, the done-mark second: a kill in between only costs this batch
        group["h"][region] = result.h.numpy().astype(config.invert.h_dtype)
        group["x0"][region] = result.images.numpy()
        group["input"][region] = images.numpy()
        group["x_T"][region] = result.x_T.float().numpy()
        group["reconstruction_error"][region] = result.reconstruction_error.numpy()
        group["target_error"][region] = result.target_error.numpy()
        group["psnr"][region] = psnr(result.images, images).numpy()
        if result.z is not None:
            group["z"][region] = result.z.float().numpy()
            if result.residual is not None:
                group["residual"][region] = result.residual.float().numpy()
        if source.labels is not None:
            group["labels"][region] = source.labels.iloc[region].to_numpy(dtype=np.float32)
        group["done"][region] = True
    missing = [i for i, done in enumerate(done_batches(group, b)) if not done]
    if missing:
        raise RuntimeError(f"invert stage: batches {missing} of {path} are not done; rerun to resume them")
    if not group.attrs.get(COMPLETE):
        mark_complete(group)
    seconds = time.perf_counter() - started
    errors = open_group(path)["reconstruction_error"][...]
    logger.info(
        "invert stage: %d batches inverted, %d skipped in %.1f s; reconstruction error max %.3g, median %.3g",
        len(todo), n_batches - len(todo), seconds, float(errors.max()), float(np.median(errors)),
    )
    return StageResult(path, n_batches, len(todo), n_batches - len(todo), len(repaired), seconds)

