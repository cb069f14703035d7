"""Direction stage: PCA, mean-difference, probe, conditional and regression directions into ``directions.zarr``.

Read it with ``xr.open_zarr(run_dir / "directions.zarr", consolidated=False)``: unit
vectors ``direction`` with dims (direction, step, channel, y, x), ``scale_unit``
(direction, step) and per-direction statistics; the coords ``name``, ``method``,
``attribute`` and ``component`` say what each direction is. The store records the
stage's input identity: its config hash, the identities of the labels and samples it was
fitted on and the PCA solver (:mod:`hmine.stages`).
"""

from __future__ import annotations

import logging
import time
import uuid
from pathlib import Path

from hmine.config import RunConfig
from hmine.stages.label import read_labels
from hmine.stages.sample import StageResult, samples_path
from hmine.stores import STORE_UUID, store_state

logger = logging.getLogger(__name__)

DIRECTIONS_STORE = "directions.zarr"


def directions_path(config: RunConfig) -> Path:
    return config.run_dir / DIRECTIONS_STORE


def _thresholds(config: RunConfig, labels, attributes) -> float | dict[str, float]:
    """``directions.threshold`` as the probes take it: the number, or each attribute's median."""
    from hmine.labelling import decision_thresholds

    threshold = config.directions.threshold
    return threshold if threshold != "median" else decision_thresholds(labels, attributes, threshold)


def run_directions_stage(config: RunConfig) -> StageResult:
    """Fit every configured direction on the run's h and labels and write them atomically."""
    import xarray as xr

    from hmine.directions import fit_directions, write_directions
    from hmine.stages import damaged_count, identity_record, up_to_date

    started = time.perf_counter()
    path = directions_path(config)
    if up_to_date(config, "directions"):
        logger.info("directions stage: %s is up to date", path)
        return StageResult(path, 1, 0, 1, 0, time.perf_counter() - started)
    repaired = int(store_state(path) == "complete" and damaged_count(config, "directions") > 0)
    if repaired:
        logger.warning("directions stage: %s lost chunk files; writing it again", path)
    check_prompt_pairs(config)  # before the fits, not after them
    attributes = list(config.label.attributes)
    if config.directions.source == "inversions":
        h, labels = inversion_h_and_labels(config)
    else:
        labels = read_labels(config)
        # absolute: a dask cluster's workers (runner.kind: dask) open the chunks themselves
        h = xr.open_zarr(samples_path(config).absolute(), consolidated=False)["h"]
    missing = [a for a in attributes if a not in labels.columns]
    if missing:
        where = "labels.parquet" if config.directions.source == "samples" else "the inverted images' labels"
        raise ValueError(f"{where} have no column {missing}; check label.attributes")
    conditional = config.directions.conditional
    for attribute, others in ({} if conditional == "all" else conditional).items():
        unknown = [a for a in [attribute, *others] if a not in attributes]
        if unknown:
            raise ValueError(
                f"directions.conditional names {unknown}, which are not in label.attributes {attributes}"
            )
    directions = fit_directions(
        h,
        labels,
        pca_components=config.directions.pca_components,
        pca_modes=list(config.directions.pca_modes),
        attributes=attributes,
        top_k=config.directions.top_k,
        probe_C=config.directions.probe_C,
        probe_components=config.directions.probe_components,
        conditional=conditional if conditional == "all" else {k: list(v) for k, v in conditional.items()},
        memory_budget_bytes=int(config.directions.memory_budget_gb * 2**30),
        random_state=config.directions.random_state,
        threshold=_thresholds(config, labels, attributes),
        probe_test_fraction=config.directions.probe_test_fraction,
        regression=config.directions.regression,
        regression_alpha=config.directions.regression_alpha,
    )
    if config.directions.prompt_pairs is not None:
        directions = with_prompt_pairs(config, directions, h)
    directions.attrs.update({
        "hmine:config_hash": config.stage_hash("directions"),
        **identity_record(config, "directions"),
        STORE_UUID: uuid.uuid4().hex,
    })
    write_directions(directions, path)
    seconds = time.perf_counter() - started
    logger.info("directions stage: %d directions in %.1f s", directions.sizes["direction"], seconds)
    return StageResult(path, 1, 1, 0, repaired, seconds)


def check_prompt_pairs(config: RunConfig, n_samples: int | None = None) -> None:
    """Refuse ``directions.prompt_pairs`` where they cannot be sampled: no text model, fitted on
    inverted images, or more seeds than the run has (``n_samples``: the run's, when known)."""
    pairs = config.directions.prompt_pairs
    if pairs is None:
        return
    if config.sample.text is None:
        raise ValueError(
            "directions.prompt_pairs needs a text-conditional model and sample.text; remove it for this model"
        )
    if config.directions.source != "samples":
        raise ValueError("directions.prompt_pairs samples the run's seeds: it needs directions.source: samples")
    n = config.sample.n_samples if n_samples is None else n_samples
    if pairs.n_seeds > n:
        raise ValueError(f"directions.prompt_pairs.n_seeds is {pairs.n_seeds} but the run has {n} samples; lower it")


def with_prompt_pairs(config: RunConfig, directions, h):
    """``directions`` followed by ``prompt_pair/<name>`` of every configured pair
    (:func:`hmine.prompt_directions.prompt_pair_directions`), sampled by the run's model and
    text settings on its first ``directions.prompt_pairs.n_seeds`` seeds and scaled by its h."""
    import xarray as xr

    from hmine.prompt_directions import prompt_pair_directions
    from hmine.stages.sample import make_sampler

    pairs = config.directions.prompt_pairs
    check_prompt_pairs(config, h.sizes["sample"])
    seeds = h["sample"].values[: pairs.n_seeds].tolist()
    sampler = make_sampler(config)
    extra = prompt_pair_directions(sampler, seeds, pairs.pairs, h, batch_size=config.sample.batch_size)
    logger.info("directions stage: %d prompt-pair directions on %d seeds", len(pairs.pairs), len(seeds))
    return xr.concat([directions, extra], dim="direction", combine_attrs="override")


def inversion_h_and_labels(config: RunConfig):
    """h and labels of the inverted images (``directions.source: inversions``).

    The labels are the images' given ones (``labels`` of ``inversions.zarr``: the label file's
    columns, the world's true factors) or, with ``directions.inversion_labels: labeller``, the
    labeller's scores of the regenerated images. Indexed by image id, like h's ``sample``.
    """
    import pandas as pd
    import xarray as xr

    from hmine.stages.invert import inversions_path
    from hmine.stores import store_state

    path = inversions_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(f"{path} is not complete; run the invert stage (`hmine invert`) first")
    ds = xr.open_zarr(path.absolute(), consolidated=False)  # absolute: for a dask cluster's workers
    ids = [str(i) for i in ds["sample"].values]
    h = ds["h"].assign_coords(sample=ids)
    if config.directions.inversion_labels == "labeller":
        from hmine.labelling import make_labeller

        labels = make_labeller(config.label).score(ds["x0"].values)
        labels.index = pd.Index(ids, name="id")
        return h, labels
    if "labels" not in ds:
        raise ValueError(
            f"{path} holds no given labels (no images.labels file); set directions.inversion_labels: labeller"
        )
    names = [str(a) for a in ds["attribute"].values]
    return h, pd.DataFrame(ds["labels"].values.astype("float64"), index=pd.Index(ids, name="id"), columns=names)
