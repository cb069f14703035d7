"""Sample stage: N images and their per-step h, written batch by batch to ``samples.zarr``.

Layout (read it with ``xr.open_zarr(run_dir / "samples.zarr", consolidated=False)``):

=========  ==============================  ===========================================
variable   dims                            meaning
=========  ==============================  ===========================================
``h``      (sample, step, channel, y, x)   bottleneck activations at every step
``x0``     (sample, color, height, width)  final images in [-1, 1]
``done``   (sample,)                       True once the sample's batch is written
``prompt`` (sample,)                       each sample's prompt (text-conditional models)
=========  ==============================  ===========================================

Coordinates: ``sample`` holds each sample's seed, ``step`` the scheduler's timestep
values, ``step_index`` the loop index. One chunk per batch along ``sample`` and one
step per chunk along ``step`` (per-step PCA reads one step at a time). A text-conditional
run's prompts are a function of the seeds (``sample.text``, :mod:`hmine.prompts`) and are
written whole with the template; its guidance settings are in the store's attributes.
"""

from __future__ import annotations

import datetime as _dt
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from hmine.chunk_checks import CHUNK_CHECKED_ARRAYS, damaged_batches, verify_done_chunks
from hmine.config import RunConfig
from hmine.sharding import ShardPlan, shard_batches  # noqa: F401  (shard_batches: hmine.stages.sample's before)
from hmine.stages.growth import samples_to_grow
from hmine.stores import (
    COMPILED,
    COMPLETE,
    CONFIG_HASH,
    DEVICE,
    GROWING,
    LINEAGE,
    STAGE_HASH,
    STORE_UUID,
    ArraySpec,
    StoreConfigMismatch,
    batch_region,
    check_same_compile,
    check_same_device,
    begin_growth,
    done_batches,
    finish_growth,
    kept_compile_note,
    mark_complete,
    open_group,
    prepare_store,
    provenance_attrs,
    store_state,
)

logger = logging.getLogger(__name__)

SAMPLES_STORE = "samples.zarr"
_WRITTEN_ARRAYS = CHUNK_CHECKED_ARRAYS[SAMPLES_STORE]


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


def damaged_sample_batches(path: Path) -> list[int]:
    """Batches marked done in a complete ``samples.zarr`` whose chunks are missing, cut short
    or fail their checksum (read-only; the batch size is the store's own chunk length)."""
    if store_state(path) != "complete":  # a partial store is resumed by the stage anyway
        return []
    group = open_group(path)
    return damaged_batches(group, path, _WRITTEN_ARRAYS, group["done"].chunks[0])


def make_sampler(config: RunConfig, model=None, *, compiled: bool = False):
    """The run's sampler (steps, eta, h position), loading ``config.model`` if not given.

    Every stage that regenerates samples uses it, so edits replay the sample stage's
    trajectories exactly. ``compiled`` applies ``model.compile``: the stages that only
    sample and regenerate ask for it; those that differentiate through the U-Net
    (Jacobian, learn) do not, so they never run a compiled graph.
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
        torch_threads=config.sample.torch_threads,
        precision=config.model.precision,
        compile=compiled and config.model.compile,
        text=config.sample.text,
    )


def progress(items: list, desc: str, unit: str, enabled: bool = True):
    """``items`` with a progress bar when enabled and there is work to show."""
    if not (enabled and items):
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=desc, unit=unit)


def _seed_spec(n: int) -> ArraySpec:
    """The ``sample`` coordinate (each sample's seed): one chunk, uncompressed."""
    return ArraySpec("sample", (n,), (n,), "int64", ("sample",), {"long_name": "seed of the sample"}, None, False)


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
                # CF convention: xarray attaches step_index (and prompt) as coordinates of h
                "coordinates": "step_index prompt" if sample.text is not None else "step_index",
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
        *(spec for spec, _ in per_sample_coordinates(config)),
        ArraySpec("step", (steps,), (steps,), "int64", ("step",), {"long_name": "scheduler timestep"}, None, False),
        ArraySpec("step_index", (steps,), (steps,), "int64", ("step",), {"long_name": "denoising step index"}, None, False),
    ]
    coords = {
        **{spec.name: values for spec, values in per_sample_coordinates(config)},
        "step": np.asarray(timesteps, dtype=np.int64),
        "step_index": np.arange(steps, dtype=np.int64),
    }
    text = {}
    if sample.text is not None:
        text = {
            "hmine:negative_prompt": sample.text.negative_prompt or "",
            "hmine:guidance_scale": sample.text.guidance_scale,
            "hmine:h_branch": sample.text.h_branch,
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
            **text,
        },
    )
    return arrays, attrs, coords


@dataclass
class SamplePlan:
    """What :func:`prepare_sample_stage` found: the store and the batches still to sample.

    ``model`` is the model ``prepare`` was given or had to load to build the store's
    template (None when the store already existed); pass it on to
    :func:`sample_batches` to avoid loading it twice in one process.
    """

    path: Path
    batch_size: int
    n_batches: int
    todo: list[int]
    repaired: list[int]
    started: float
    model: object = None


def _image_shape(model) -> tuple[int, ...]:
    return model.image_shape


def prepare_sample_stage(config: RunConfig, *, model=None) -> SamplePlan:
    """Create or reopen ``samples.zarr`` and list the batches still to sample.

    A store marked complete is re-verified (chunks may have been lost since); batches
    marked done whose chunk files are missing or truncated are un-marked and listed
    again. The model is loaded only to build the template of a store that does not
    exist yet. A store written by another config raises
    :class:`~hmine.stores.StoreConfigMismatch`.
    """
    from hmine.hooks import h_shape as find_h_shape

    started = time.perf_counter()
    repaired: list[int] = []
    path = samples_path(config)
    n, b = config.sample.n_samples, config.sample.batch_size
    n_batches = -(-n // b)
    state = store_state(path)
    if state in ("partial", "complete"):
        grow_sample_store(config, path)  # more samples asked for: the store grows (and is partial)
        state = store_state(path)
    if state == "complete":
        group = open_group(path, mode="r+")
        if group.attrs.get(CONFIG_HASH) == config.stage_hash("sample"):
            # the complete mark is not trusted blindly: chunks may have been lost since
            repaired = verify_done_chunks(group, path, _WRITTEN_ARRAYS, b)
            if not repaired:
                logger.info("sample stage: %s is complete, nothing to do%s", path,
                            kept_compile_note(config.model.compile, group.attrs))  # fmt: skip
                return SamplePlan(path, b, n_batches, [], [], started, model)
    lost_array = state in ("partial", "complete") and any(name not in open_group(path) for name in _WRITTEN_ARRAYS)
    if state in ("partial", "complete") and not lost_array:
        # the template is only needed to create a store (or an array whose folder was
        # lost); an existing one is reopened (or refused, if another config wrote it) as it is
        arrays, attrs = [], {CONFIG_HASH: config.stage_hash("sample")}
        coords = None
    else:
        sampler = make_sampler(config, model)
        model = sampler.model
        shape_of_h = find_h_shape(model.unet, config.model.h_position)
        arrays, attrs, coords = _store_template(config, shape_of_h, _image_shape(model), sampler.timesteps.numpy())
        attrs.update(_compute_record(config, next(model.unet.parameters()).dtype))
    group = prepare_store(path, arrays, attrs, coords)
    repaired = sorted(set(repaired) | set(verify_done_chunks(group, path, _WRITTEN_ARRAYS, b)))
    if repaired:
        logger.warning("sample stage: batches %s had damaged chunks and will be redone", repaired)
        if group.attrs.get(LINEAGE):  # redone rows are not checked to equal the old ones: keep nothing
            group.attrs[LINEAGE] = []
    todo = [i for i, done in enumerate(done_batches(group, b)) if not done]
    if todo and not arrays:
        check_same_numerics(config, group.attrs, path)
    return SamplePlan(path, b, n_batches, todo, repaired, started, model)


def _compute_record(config: RunConfig, dtype) -> dict:
    """Where, in which precision and whether compiled the store's batches are computed
    (``hmine:device``, ``hmine:dtype``, ``hmine:compiled``) and the software that computes them."""
    from hmine.models import device_identity
    from hmine.runtime import software_record

    return {DEVICE: device_identity(config.model.device), "hmine:dtype": str(dtype).removeprefix("torch."),
            COMPILED: config.model.compile, **software_record()}


def check_same_numerics(config: RunConfig, attrs, path: Path) -> None:
    """Refuse to add batches to a store begun on another device (:func:`hmine.stores.check_same_device`),
    in another precision, or compiled when this run is not (or the reverse)."""
    from hmine.models import device_identity

    check_same_device(device_identity(config.model.device), attrs, path, config.model.device)
    dtype = attrs.get("hmine:dtype")
    if dtype is not None and dtype != "float32":
        raise StoreConfigMismatch(f"{path} was begun in {dtype}; hmine samples in float32: use another run name")
    check_same_compile(config.model.compile, attrs, path)


# -- growing a run: more samples of the same config --------------------------------------


def grow_sample_store(config: RunConfig, path: Path) -> int | None:
    """Grow an existing ``samples.zarr`` to ``config.sample.n_samples``, or finish a growth
    a kill interrupted; return the sample count it held (None: no growth asked for).

    The arrays along ``sample`` are resized with the same chunks and the new seeds are
    sampled batch by batch like any partial store (:func:`prepare_sample_stage` lists
    them). A last batch the old store held only in part is sampled again whole, as a fresh
    run of the new size samples it, so the grown store equals that run bit for bit.
    Growth is two steps (:func:`~hmine.stores.begin_growth`, one attribute write that
    makes the store partial with its new identity and a new uuid;
    :func:`~hmine.stores.finish_growth`, idempotent): a kill at any moment leaves a store
    that no stage reads as complete and that the next run finishes.
    """
    group = open_group(path, mode="r+")
    held = samples_to_grow(config, group.attrs, path)
    n, b = config.sample.n_samples, config.sample.batch_size
    coordinates = per_sample_coordinates(config)
    if held is not None:
        check_same_numerics(config, group.attrs, path)  # before anything changes
        known = {*_GROWN_ARRAYS, *(spec.name for spec, _ in coordinates)}
        along_sample = [k for k in sorted(group.array_keys()) if (group[k].metadata.dimension_names or ())[:1] == ("sample",)]
        unknown = [k for k in along_sample if k not in known]
        if unknown:
            raise StoreConfigMismatch(
                f"{path} cannot grow: its arrays {unknown} along sample have no rule for new samples "
                "(hmine.stages.sample.per_sample_coordinates); use another run name for more samples"
            )
        complete = bool(group.attrs.get(COMPLETE))
        entry = {
            # the old store's uuid only if something downstream can have read it (complete)
            "uuid": group.attrs.get(STORE_UUID) if complete else None,
            "n_samples": held,
            "unchanged": held - held % b,  # a last batch held in part is sampled again whole
            "grown": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        identity = (CONFIG_HASH, "hmine:input_identity", STAGE_HASH, "hmine:stage_config")
        attrs = provenance_attrs(config.stage_inputs("sample"), config.stage_hash("sample"))
        begin_growth(group, n, {k: attrs[k] for k in identity}, entry)
        logger.info("sample stage: %s grows from %d to %d samples", path, held, n)
    if group.attrs.get(GROWING) is not None:
        finish_growth(group, _GROWN_ARRAYS, tuple(coordinates))
    return held


_GROWN_ARRAYS = ("h", "x0", "done")  # resized along sample; the coordinates are written anew


def per_sample_coordinates(config: RunConfig) -> list[tuple[ArraySpec, np.ndarray]]:
    """The store's arrays along ``sample`` known before sampling, with their values: written
    anew whole (one chunk, as in a fresh store) when the store grows. Each sample's seed,
    and a text-conditional run's prompt (a function of the seed, :mod:`hmine.prompts`)."""
    sample = config.sample
    coordinates = [(_seed_spec(sample.n_samples), np.asarray(sample.seeds, dtype=np.int64))]
    if sample.text is not None:
        n = sample.n_samples
        spec = ArraySpec("prompt", (n,), (n,), str, ("sample",), {"long_name": "prompt of the sample"}, None, False)
        coordinates.append((spec, np.asarray([sample.text.prompt_for(seed) for seed in sample.seeds], dtype=str)))
    return coordinates


def sample_batches(
    config: RunConfig, batches: list[int], *, model=None, show_progress: bool = False, expected_hash: str | None = None
) -> list[int]:
    """Sample the given batches into a prepared ``samples.zarr``; return those computed.

    Batches already marked done are skipped, so a shard that runs twice (a retried task,
    a rescheduled worker) costs nothing the second time. Each batch is written data
    first, done-mark second: a kill in between only costs that batch.

    Batches may be sampled in any order, in separate calls, processes or machines
    sharing the filesystem, concurrently: a batch's region is exactly one chunk row of
    every array it writes (``h`` chunks are ``(batch_size, 1, ...)``, ``x0`` and ``done``
    chunks are one batch long), so two batches never write the same chunk file, and
    zarr writes each chunk file atomically. Only :func:`prepare_sample_stage` and
    :func:`finish_sample_stage` touch the store's attributes.

    Parameters
    ----------
    config : RunConfig
    batches : list of int
        Batch indices (batch ``i`` holds samples ``i * batch_size`` onwards).
    model : DiffusionModel, optional
        An already loaded model (else ``config.model`` is loaded, only if a batch is left).
    show_progress : bool, default=False
    expected_hash : str, optional
        The config hash the store must have (default: ``config``'s own). A Dask worker gets
        its caller's, since its config's absolute paths may hash differently
        (:func:`hmine.sharding.worker_config`).
    """
    path = samples_path(config)
    if store_state(path) not in ("partial", "complete"):
        raise FileNotFoundError(f"{path} has no store template; run prepare_sample_stage first")
    group = open_group(path, mode="r+")
    expected = expected_hash or config.stage_hash("sample")
    if group.attrs.get(CONFIG_HASH) != expected:
        raise StoreConfigMismatch(f"{path} was written by config {group.attrs.get(CONFIG_HASH)}, not {expected}")
    if group.attrs.get(GROWING) is not None:
        raise RuntimeError(f"{path} is being grown; run prepare_sample_stage first to finish its growth")
    n, b = config.sample.n_samples, config.sample.batch_size
    done = done_batches(group, b)
    if any(batch < 0 for batch in batches):
        raise IndexError(f"negative batch index in {batches}")
    regions = {batch: batch_region(batch, b, n) for batch in batches}  # IndexError past the end
    todo = [batch for batch in dict.fromkeys(batches) if not done[batch]]
    if not todo:
        return []
    sampler = make_sampler(config, model, compiled=True)
    seeds = np.asarray(config.sample.seeds)
    for batch in progress(todo, "sample", "batch", show_progress):
        region = regions[batch]
        out = sampler.sample(seeds[region].tolist())
        # one chunk row per array, disjoint from every other batch's: concurrent workers
        # on a shared filesystem never write the same chunk file.
        # data first, the done-mark second: a kill in between only costs this batch
        group["h"][region] = out.h.float().cpu().numpy().astype(config.sample.h_dtype)
        group["x0"][region] = out.images.float().cpu().numpy().astype(config.sample.images_dtype)
        group["done"][region] = True
    return todo


def finish_sample_stage(plan: SamplePlan, computed: int | None = None) -> StageResult:
    """Mark the store complete once every batch is done; return the stage's result.

    ``computed`` is the number of batches sampled since ``plan`` was made (default: all
    of ``plan.todo``). Raises RuntimeError, leaving the store partial, if a batch is
    still not done (a shard failed or was never run).
    """
    group = open_group(plan.path, mode="r+")
    missing = [i for i, done in enumerate(done_batches(group, plan.batch_size)) if not done]
    if missing:
        raise RuntimeError(
            f"sample stage: batches {missing} of {plan.path} are not done; rerun to resume them"
        )
    if not group.attrs.get(COMPLETE):
        mark_complete(group)
    computed = len(plan.todo) if computed is None else computed
    seconds = time.perf_counter() - plan.started
    if plan.todo:
        logger.info(
            "sample stage: %d batches computed, %d skipped in %.1f s", computed, plan.n_batches - computed, seconds
        )
    return StageResult(plan.path, plan.n_batches, computed, plan.n_batches - computed, len(plan.repaired), seconds)


def prepare_sample_shards(config: RunConfig) -> ShardPlan:
    """:func:`prepare_sample_stage` as a sharded stage's first step (:mod:`hmine.sharding`):
    the units are batch indices; the model loaded to build a template is not kept."""
    plan = prepare_sample_stage(config)
    plan.model = None  # each shard loads its own
    return ShardPlan(plan.todo, config.stage_hash("sample"), plan)


def sample_shard(config: RunConfig, batches: list[int], identity: str) -> list[int]:
    """:func:`sample_batches` as a sharded stage's work step, on a store of config hash ``identity``."""
    return sample_batches(config, batches, expected_hash=identity)


def finish_sample_shards(config: RunConfig, plan: ShardPlan, computed: int) -> StageResult:
    return finish_sample_stage(plan.state, computed)


def run_sample_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Sample every seed of ``config.sample`` into ``samples.zarr``, resuming if partial.

    The three steps in one process: :func:`prepare_sample_stage`,
    :func:`sample_batches` over every batch left, :func:`finish_sample_stage`. The
    Prefect flow runs the same steps with the batches spread over Dask workers.

    Parameters
    ----------
    config : RunConfig
    model : DiffusionModel, optional
        An already loaded model (else ``config.model`` is loaded).
    show_progress : bool, default=True
        Show a progress bar over batches.
    """
    plan = prepare_sample_stage(config, model=model)
    computed = sample_batches(config, plan.todo, model=plan.model, show_progress=show_progress)
    return finish_sample_stage(plan, len(computed))
