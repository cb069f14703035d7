"""Sample stage: N images and their per-step h, written batch by batch to ``samples.zarr``.

Layout (read it with ``xr.open_zarr(run_dir / "samples.zarr", consolidated=False)``):

=========  ==============================  ===========================================
variable   dims                            meaning
=========  ==============================  ===========================================
``h``      (sample, step, channel, y, x)   bottleneck activations at every step
``x0``     (sample, color, height, width)  final images in [-1, 1]
``done``   (sample,)                       True once the sample's batch is written
=========  ==============================  ===========================================

Coordinates: ``sample`` holds each sample's seed, ``step`` the scheduler's timestep
values, ``step_index`` the loop index. One chunk per batch along ``sample`` and one
step per chunk along ``step`` (per-step PCA reads one step at a time).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmine.config import RunConfig
from hmine.stores import (
    CONFIG_HASH,
    ArraySpec,
    open_group,
    done_batches,
    batch_region,
    mark_complete,
    prepare_store,
    provenance_attrs,
    store_state,
    verify_done_chunks,
)

logger = logging.getLogger(__name__)

SAMPLES_STORE = "samples.zarr"
_WRITTEN_ARRAYS = ["h", "x0"]


@dataclass
class StageResult:
    """What a stage did: where it wrote, how much of it was new, and how long it took."""

    path: Path
    total: int
    computed: int
    skipped: int
    repaired: int
    seconds: float


def samples_path(config: RunConfig) -> Path:
    return config.run_dir / SAMPLES_STORE


def make_sampler(config: RunConfig, model=None):
    """The run's sampler (steps, eta, h position), loading ``config.model`` if not given.

    Every stage that regenerates samples uses it, so edits replay the sample stage's
    trajectories exactly.
    """
    from hmine.models import load_model
    from hmine.sampling import Sampler

    if model is None:
        model = load_model(config.model.id, revision=config.model.revision, device=config.model.device)
    return Sampler(
        model,
        num_inference_steps=config.sample.num_inference_steps,
        eta=config.sample.eta,
        h_position=config.model.h_position,
    )


def progress(items: list, desc: str, unit: str, enabled: bool = True):
    """``items`` with a progress bar when enabled and there is work to show."""
    if not (enabled and items):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def _store_template(config: RunConfig, h_shape, image_shape, timesteps) -> tuple[list, dict, dict]:
    sample = config.sample
    n, steps, b = sample.n_samples, sample.num_inference_steps, sample.batch_size
    arrays = [
        ArraySpec(
            "h",
            (n, steps, *h_shape),
            (b, 1, *h_shape),
            sample.h_dtype,
            ("sample", "step", "channel", "y", "x"),
            {
                "long_name": f"U-Net h-space activations ({config.model.h_position} the mid block)",
                "units": "1",
                # CF convention: xarray attaches step_index as a coordinate of h
                "coordinates": "step_index",
            },
        ),
        ArraySpec(
            "x0",
            (n, *image_shape),
            (b, *image_shape),
            sample.images_dtype,
            ("sample", "color", "height", "width"),
            {"long_name": "generated image", "units": "pixel value in [-1, 1]"},
        ),
        ArraySpec("done", (n,), (b,), "bool", ("sample",), {"long_name": "batch written"}, False, False),
        ArraySpec("sample", (n,), (n,), "int64", ("sample",), {"long_name": "seed of the sample"}, None, False),
        ArraySpec("step", (steps,), (steps,), "int64", ("step",), {"long_name": "scheduler timestep"}, None, False),
        ArraySpec("step_index", (steps,), (steps,), "int64", ("step",), {"long_name": "denoising step index"}, None, False),
    ]
    coords = {
        "sample": np.asarray(sample.seeds, dtype=np.int64),
        "step": np.asarray(timesteps, dtype=np.int64),
        "step_index": np.arange(steps, dtype=np.int64),
    }
    attrs = provenance_attrs(
        config.stage_inputs("sample"),
        config.stage_hash("sample"),
        {
            "hmine:model_id": config.model.id,
            "hmine:model_revision": config.model.revision or "",
            "hmine:h_position": config.model.h_position,
            "hmine:eta": sample.eta,
            "hmine:num_inference_steps": steps,
        },
    )
    return arrays, attrs, coords


def run_sample_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Sample every seed of ``config.sample`` into ``samples.zarr``, resuming if partial.

    Parameters
    ----------
    config : RunConfig
    model : DiffusionModel, optional
        An already loaded model (else ``config.model`` is loaded).
    show_progress : bool, default=True
        Show a progress bar over batches.
    """
    from hmine.hooks import h_shape as find_h_shape

    started = time.perf_counter()
    repaired: list[int] = []
    path = samples_path(config)
    n, b = config.sample.n_samples, config.sample.batch_size
    n_batches = -(-n // b)
    if store_state(path) == "complete":
        group = open_group(path, mode="r+")
        if group.attrs.get(CONFIG_HASH) == config.stage_hash("sample"):
            # the complete mark is not trusted blindly: chunks may have been lost since
            repaired = verify_done_chunks(group, path, _WRITTEN_ARRAYS, b)
            if not repaired:
                logger.info("sample stage: %s is complete, nothing to do", path)
                return StageResult(path, n_batches, 0, n_batches, 0, time.perf_counter() - started)
    sampler = make_sampler(config, model)
    model = sampler.model
    shape_of_h = find_h_shape(model.unet, config.model.h_position)
    size = model.unet.config.sample_size
    image_size = (size, size) if isinstance(size, int) else tuple(size)
    if model.vqvae is not None:
        image_size = tuple(s * 2 ** (len(model.vqvae.config.block_out_channels) - 1) for s in image_size)
    image_shape = (3, *image_size)
    arrays, attrs, coords = _store_template(config, shape_of_h, image_shape, sampler.timesteps.numpy())
    group = prepare_store(path, arrays, attrs, coords)
    repaired = sorted(set(repaired) | set(verify_done_chunks(group, path, _WRITTEN_ARRAYS, b)))
    if repaired:
        logger.warning("sample stage: batches %s had damaged chunks and will be redone", repaired)
    todo = [i for i, done in enumerate(done_batches(group, b)) if not done]
    seeds = np.asarray(config.sample.seeds)
    for batch in progress(todo, "sample", "batch", show_progress):
        region = batch_region(batch, b, n)
        out = sampler.sample(seeds[region].tolist())
        # data first, the done-mark second: a kill in between only costs this batch
        group["h"][region] = out.h.float().cpu().numpy().astype(config.sample.h_dtype)
        group["x0"][region] = out.images.float().cpu().numpy().astype(config.sample.images_dtype)
        group["done"][region] = True
    mark_complete(group)
    seconds = time.perf_counter() - started
    logger.info("sample stage: %d batches computed, %d skipped in %.1f s", len(todo), n_batches - len(todo), seconds)
    return StageResult(path, n_batches, len(todo), n_batches - len(todo), len(repaired), seconds)
