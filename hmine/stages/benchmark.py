"""Benchmark stage: every direction method against the embedded world's known factors, in one table.

``hmine benchmark CONFIG`` (or ``benchmark.enabled: true`` in a whole run) edits the first
``benchmark.n_samples`` samples with every candidate direction (:mod:`hmine.benchmark`; the
Jacobian stage's per-image directions on its analysed samples, ``benchmark.jacobian``) at
``±benchmark.scales``, in the edit stage's window and step rule (``edit.t_edit``,
``edit.t_edit_max``, ``edit.asymmetric``), and writes ``benchmark.parquet``: per (method,
binary attribute, side), the strength that flips 90 % of the far side, the leakage and the
image quality there and the random baseline's flip rate at the same ||delta h||
(:func:`hmine.benchmark.table.benchmark_table`), and ``benchmark_sweep.png``, the first
sample along every benchmarked direction (:mod:`hmine.sweeps`). The report's benchmark
section draws the table as heat maps (:func:`hmine.benchmark.report.benchmark_section`).

Only for the world labeller: the benchmark needs attributes whose truth the labeller knows,
and continuous factors to measure leakage on.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.config import RunConfig
from hmine.stages.sample import StageResult, make_sampler, samples_path
from hmine.stores import open_group, store_state, write_table

logger = logging.getLogger(__name__)

BENCHMARK_TABLE = "benchmark.parquet"
SWEEP_FIGURE = "benchmark_sweep.png"  # the first sample along every benchmarked direction


def benchmark_path(config: RunConfig) -> Path:
    return config.run_dir / BENCHMARK_TABLE


def check_benchmark(config: RunConfig) -> None:
    """The benchmark reads known factors: the world labeller only."""
    if config.label.labeller != "world":
        raise ValueError(
            f"the benchmark scores directions against the shapes world's known factors, but label.labeller is "
            f"{config.label.labeller!r}; run it on a world run (label.labeller: world)"
        )


def run_benchmark_stage(config: RunConfig, *, model=None, labeller=None) -> StageResult:
    """Write ``benchmark.parquet`` (module docstring); skip when it is up to date."""
    from hmine.benchmark.candidates import norm_per_scale, random_candidate, stored_candidates
    from hmine.benchmark.measure import edit_and_measure, signed_scales
    from hmine.benchmark.table import benchmark_table
    from hmine.directions import open_directions
    from hmine.editing import edit_steps_from
    from hmine.labelling import decision_thresholds, make_labeller
    from hmine.stages import identity_record, up_to_date
    from hmine.stages.directions import directions_path
    from hmine.stages.label import read_labels
    from hmine.sweeps import write_sweep
    from hmine.world.classifier import THRESHOLDED_ATTRIBUTES

    started = time.perf_counter()
    path, settings = benchmark_path(config), config.benchmark
    check_benchmark(config)
    if up_to_date(config, "benchmark"):
        logger.info("benchmark stage: %s is up to date", path)
        return StageResult(path, 1, 0, 1, 0, time.perf_counter() - started)
    if store_state(samples_path(config)) != "complete":
        raise FileNotFoundError(f"{samples_path(config)} is not complete; run the sample stage first")
    samples = open_group(samples_path(config))
    if settings.n_samples > samples["sample"].shape[0]:
        raise ValueError(
            f"benchmark.n_samples is {settings.n_samples} but the run has {samples['sample'].shape[0]} samples; "
            "lower benchmark.n_samples"
        )
    seeds = samples["sample"][: settings.n_samples].tolist()
    binary = list(config.label.attributes)
    labeller = labeller or make_labeller(config.label, config.model.device)
    continuous = [c for c in ("size", "x", "y", "background") if c in labeller.attributes]
    thresholds = decision_thresholds(read_labels(config), binary, config.directions.threshold)
    candidates = stored_candidates(open_directions(directions_path(config)), binary, settings.pca_components)
    sampler = make_sampler(config, model, compiled=True)
    candidates += per_image_candidates(config, sampler.timesteps.tolist())
    candidates.append(random_candidate(candidates, settings.random_seed))
    edited = sorted({*seeds, *(s for c in candidates if c.seeds is not None for s in c.seeds)})
    position = {int(seed): i for i, seed in enumerate(samples["sample"][...])}
    stored = samples["x0"][: max(position[s] for s in edited) + 1]  # the first samples: both sets are
    originals = {s: stored[position[s]] for s in edited}
    edit_steps = edit_steps_from(sampler.timesteps.tolist(), config.edit.t_edit, config.edit.t_edit_max)
    logger.info("benchmark stage: %d directions x %d scales x %d samples", len(candidates),
                2 * len(settings.scales), len(seeds))  # fmt: skip
    effects, sweep = edit_and_measure(
        sampler, seeds, originals, candidates, settings.scales, labeller, thresholds,
        edit_steps=edit_steps, asymmetric=config.edit.asymmetric, batch_size=settings.batch_size,
    )  # fmt: skip
    norms = {c.name: norm_per_scale(c, edit_steps) for c in candidates}
    own_factor = {a: factor for a, (factor, _, _) in THRESHOLDED_ATTRIBUTES.items()}
    counts = {c.name: len(seeds if c.seeds is None else c.seeds) for c in candidates}
    table = benchmark_table(candidates, effects, norms, binary, continuous, own_factor, counts)
    write_sweep(np.stack([sweep[c.name] for c in candidates]), [c.name for c in candidates],
                signed_scales(settings.scales), config.run_dir / SWEEP_FIGURE)  # fmt: skip
    write_table(table, path, {"hmine:config_hash": config.stage_hash("benchmark"), **identity_record(config, "benchmark")})
    seconds = time.perf_counter() - started
    logger.info("benchmark stage: %d rows in %.1f s", len(table), seconds)
    return StageResult(path, 1, 1, 0, 0, seconds)


def per_image_candidates(config: RunConfig, run_steps: list[int]) -> list:
    """The Jacobian stage's per-image directions (:func:`hmine.benchmark.candidates.jacobian_candidates`),
    when ``benchmark.jacobian`` and the run analyses samples; else none."""
    import xarray as xr

    from hmine.benchmark.candidates import jacobian_candidates
    from hmine.stages.builtin import benchmark_reads_jacobian
    from hmine.stages.jacobian import jacobian_path

    if not benchmark_reads_jacobian(config):
        return []
    path = jacobian_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(
            f"benchmark.jacobian is true but {path} is not complete; run the jacobian stage first "
            "(hmine run does), or set benchmark.jacobian: false"
        )
    h = xr.open_zarr(samples_path(config), consolidated=False)["h"]
    return jacobian_candidates(open_group(path), run_steps, h)


def read_benchmark(run_dir: Path) -> pd.DataFrame:
    return pd.read_parquet(Path(run_dir) / BENCHMARK_TABLE)
