"""h-space directions from prompt pairs: the mean change of h when only the prompt changes.

For a text-conditional model, sample the same seeds (same x_T, same noise) once with
prompt A ("a photo of a face") and once with prompt B ("a photo of a smiling face"); the
direction at step t is the mean over seeds of ``h_t(seed, B) - h_t(seed, A)``. Since the
seeds are shared, the noise cancels pairwise and what is left is the prompt's effect on h
along the trajectories (of the branch ``sample.text.h_branch`` names; for the
unconditional branch both prompts give the same h unless the negative prompt differs,
so use the conditional one).

The result is a *raw* direction in :mod:`hmine.directions`' sense (float64, dims
``(step, channel, y, x)``, coordinate ``step``); :func:`hmine.directions.normalise_direction`
with a run's h brings it to the library's scale convention, like every other method.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import xarray as xr

from hmine.sampling import Sampler


def prompt_pair_direction(
    sampler: Sampler,
    seeds: Sequence[int],
    prompt_a: str,
    prompt_b: str,
    *,
    batch_size: int = 16,
) -> xr.DataArray:
    """Mean over ``seeds`` of h(prompt_b) - h(prompt_a), per step.

    Parameters
    ----------
    sampler : hmine.sampling.Sampler
        A text-conditional model's sampler (its guidance scale, negative prompt, steps,
        eta and h branch are used).
    seeds : sequence of int
        The shared seeds.
    prompt_a, prompt_b : str
        The direction points from A to B.
    batch_size : int, default=16
        Seeds per sampling call.

    Returns
    -------
    xarray.DataArray of shape (step, channel, y, x), float64
        Named ``prompt_pair``; attrs ``method``, ``prompt_a``, ``prompt_b``, ``n_seeds``.

    Raises
    ------
    ValueError
        No seeds, a sampler without text, or a prompt over the tokenizer's limit.
    """
    if sampler.text is None:
        raise ValueError("prompt-pair directions need a text-conditional model: give the sampler sample.text")
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("prompt-pair directions need at least one seed")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    for prompt in (prompt_a, prompt_b):
        sampler.text.embed(prompt, "prompt pair")  # refuse an over-long prompt before sampling
    total = None
    for start in range(0, len(seeds), batch_size):
        chunk = seeds[start : start + batch_size]
        h_a = sampler.sample(chunk, prompts=[prompt_a] * len(chunk)).h
        h_b = sampler.sample(chunk, prompts=[prompt_b] * len(chunk)).h
        difference = (h_b.double() - h_a.double()).sum(dim=0).cpu().numpy()
        total = difference if total is None else total + difference
    return xr.DataArray(
        total / len(seeds),
        dims=("step", "channel", "y", "x"),
        coords={"step": np.asarray(sampler.timesteps, dtype=np.int64)},
        name="prompt_pair",
        attrs={"method": "prompt_pair", "prompt_a": prompt_a, "prompt_b": prompt_b, "n_seeds": len(seeds)},
    )


def prompt_pair_directions(
    sampler: Sampler,
    seeds: Sequence[int],
    pairs: Mapping[str, tuple[str, str]],
    h: xr.DataArray,
    *,
    batch_size: int = 16,
) -> xr.Dataset:
    """``prompt_pair/<name>`` for every named (A, B) pair, in the scale convention of ``h``.

    Each pair's :func:`prompt_pair_direction` on ``seeds``, brought to the library's
    convention by :func:`hmine.directions.normalise_directions` with ``h`` (a run's h: unit
    per step, ``scale_unit`` the std of h projected on it), stacked as
    :func:`hmine.directions.build_direction_dataset` does: method ``prompt_pair``,
    attribute the pair's name. Every prompt is checked against the tokenizer's limit
    before anything is sampled.
    """
    from hmine.directions import Direction, build_direction_dataset, normalise_directions

    if not pairs:
        raise ValueError("no prompt pairs")
    if sampler.text is None:
        raise ValueError("prompt-pair directions need a text-conditional model: give the sampler sample.text")
    for a, b in pairs.values():
        for prompt in (a, b):
            sampler.text.embed(prompt, "prompt pair")
    raws = [prompt_pair_direction(sampler, seeds, a, b, batch_size=batch_size) for a, b in pairs.values()]
    normalised = normalise_directions(raws, h)
    return build_direction_dataset([
        Direction(name=f"prompt_pair/{name}", method="prompt_pair", unit=unit, scale_unit=scale, attribute=name)
        for name, (unit, scale) in zip(pairs, normalised)
    ])  # fmt: skip
