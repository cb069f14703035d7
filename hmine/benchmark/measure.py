"""The benchmark's edits: every candidate at every scale, through the one edit engine, and their effects.

Each candidate direction is edited at ``-s`` and ``+s`` for every benchmark strength ``s``
on the same samples (a per-image direction: on its own samples), as rows of :func:`hmine.regeneration.regenerate` at a fixed U-Net
batch (so the images are the edit stage's bits for the same direction, scale, window and
step rule); scale 0 is the stored ``x0``. A candidate's images are scored as soon as its
rows are done (:func:`hmine.effects.measure_effects`: decisions, score changes, image
quality) and then dropped, so memory holds one candidate's images at a time, plus the rows
in flight; only the first sample's are kept, for the sweep figure (rows directions, columns
scales).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

logger = logging.getLogger(__name__)


def signed_scales(strengths) -> list[float]:
    """-s, 0 and +s for every strength s, ascending."""
    magnitudes = sorted({abs(float(s)) for s in strengths} - {0.0})
    return [-s for s in reversed(magnitudes)] + [0.0] + magnitudes


def edit_and_measure(sampler, seeds, originals, candidates, strengths, labeller, thresholds, *,
                     edit_steps, asymmetric: bool, batch_size: int) -> tuple[dict[str, pd.DataFrame], dict]:  # fmt: skip
    """Each candidate's effects table (rows scale x attribute, scales :func:`signed_scales`), and
    each one's images of its first sample (scale, C, H, W) for the sweep figure.

    Parameters
    ----------
    sampler : hmine.sampling.Sampler
    seeds : sequence of int
        The samples every shared direction edits; a per-image candidate edits its own ``seeds``.
    originals : dict
        The stored image (C, H, W) of every edited seed (scale 0).
    candidates : list of :class:`hmine.benchmark.candidates.Candidate`
    strengths : sequence of float
    labeller : object with ``score(images) -> DataFrame``
    thresholds : dict
        Decision thresholds of the binary attributes.
    edit_steps, asymmetric, batch_size
        The edit window, the step rule and the U-Net batch (:func:`hmine.regeneration.regenerate`).
    """
    from hmine.effects import measure_effects
    from hmine.regeneration import first_edited_step, regenerate, unedited_states

    scales = signed_scales(strengths)
    edited = [s for s in scales if s != 0.0]
    shared = [int(s) for s in seeds]
    edited_seeds = [shared if c.seeds is None else [int(s) for s in c.seeds] for c in candidates]
    every_seed = sorted(set().union(*edited_seeds))
    starts = dict(zip(every_seed, unedited_states(sampler, every_seed, first_edited_step(edit_steps), batch_size)))
    deltas, delta_index, row_seeds, row_place = _rows(candidates, edited_seeds, edited)
    images: dict[int, np.ndarray] = {}
    remaining = {c: len(edited) * len(s) for c, s in enumerate(edited_seeds)}
    effects, sweep = {}, {}
    rows = regenerate(sampler, row_seeds, deltas, delta_index, edit_steps=edit_steps, asymmetric=asymmetric,
                      batch_size=batch_size, start_states=starts)  # fmt: skip
    for done, batch in rows:
        for r, image in zip(done, batch):
            c, k, sample = row_place[int(r)]
            if c not in images:  # (scale, sample, ...), scale 0 the stored images
                stored = np.stack([np.asarray(originals[s], dtype=np.float32) for s in edited_seeds[c]])
                images[c] = np.repeat(stored[None], len(scales), axis=0)
            images[c][scales.index(edited[k]), sample] = image
            remaining[c] -= 1
            if remaining[c] == 0:
                name, done_images = candidates[c].name, images.pop(c)
                effects[name] = measure_effects({"images": done_images[None]}, [name], scales, labeller, thresholds)
                sweep[name] = done_images[:, 0].copy()
                logger.info("benchmark: %s edited and measured (%d of %d)", name, len(effects), len(candidates))
    return effects, sweep


def _rows(candidates, edited_seeds, edited_scales):
    """The regenerated rows, candidate-major (candidates complete one after another), then scale,
    then sample: the deltas, each row's delta and seed, and each row's (candidate, scale, sample)."""
    import torch

    from hmine.editing import delta_for

    deltas, delta_index, row_seeds, row_place = [], [], [], []
    for c, (candidate, seeds) in enumerate(zip(candidates, edited_seeds)):
        for k, scale in enumerate(edited_scales):
            delta = delta_for(candidate.unit, candidate.scale_unit, scale)  # (step, ...) or per image (seed, step, ...)
            per_image = candidate.seeds is not None
            for sample, seed in enumerate(seeds):
                if per_image or sample == 0:
                    deltas.append(delta[sample] if per_image else delta)
                delta_index.append(len(deltas) - 1)
                row_seeds.append(seed)
                row_place.append((c, k, sample))
    return torch.stack(deltas), np.asarray(delta_index), row_seeds, row_place
