"""The benchmark's edits: every candidate at every scale, through the one edit engine, and their effects.

Each candidate direction is edited at ``-s`` and ``+s`` for every benchmark strength ``s``
on the same samples, as rows of :func:`hmine.regeneration.regenerate` at a fixed U-Net
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
    each one's images of the first sample (scale, C, H, W) for the sweep figure.

    Parameters
    ----------
    sampler : hmine.sampling.Sampler
    seeds : sequence of int
        The edited samples' seeds; ``originals`` (n, C, H, W) their stored images (scale 0).
    candidates : list of :class:`hmine.benchmark.candidates.Candidate`
    strengths : sequence of float
    labeller : object with ``score(images) -> DataFrame``
    thresholds : dict
        Decision thresholds of the binary attributes.
    edit_steps, asymmetric, batch_size
        The edit window, the step rule and the U-Net batch (:func:`hmine.regeneration.regenerate`).
    """
    import torch

    from hmine.editing import delta_for
    from hmine.effects import measure_effects
    from hmine.regeneration import first_edited_step, regenerate, unedited_states

    scales = signed_scales(strengths)
    edited = [s for s in scales if s != 0.0]
    seeds = [int(s) for s in seeds]
    originals = np.asarray(originals, dtype=np.float32)
    n = len(seeds)
    starts = dict(zip(seeds, unedited_states(sampler, seeds, first_edited_step(edit_steps), batch_size)))
    deltas = torch.stack([delta_for(c.unit, c.scale_unit, s) for c in candidates for s in edited])
    # rows candidate-major, then scale, then sample: candidates complete one after another
    per_candidate = len(edited) * n
    delta_index = np.repeat(np.arange(len(candidates) * len(edited)), n)
    row_seeds = np.tile(seeds, len(candidates) * len(edited)).tolist()
    images: dict[int, np.ndarray] = {}
    remaining = {c: per_candidate for c in range(len(candidates))}
    effects, sweep = {}, {}
    rows = regenerate(sampler, row_seeds, deltas, delta_index, edit_steps=edit_steps, asymmetric=asymmetric,
                      batch_size=batch_size, start_states=starts)  # fmt: skip
    for done, batch in rows:
        for r, image in zip(done, batch):
            c, rest = divmod(int(r), per_candidate)
            k, sample = divmod(rest, n)
            slab = images.setdefault(c, np.repeat(originals[None], len(scales), axis=0))  # (scale, sample, ...)
            slab[scales.index(edited[k]), sample] = image
            remaining[c] -= 1
            if remaining[c] == 0:
                name, done_images = candidates[c].name, images.pop(c)
                effects[name] = measure_effects({"images": done_images[None]}, [name], scales, labeller, thresholds)
                sweep[name] = done_images[:, 0].copy()
                logger.info("benchmark: %s edited and measured (%d of %d)", name, len(effects), len(candidates))
    return effects, sweep
