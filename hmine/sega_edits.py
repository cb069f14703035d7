"""SEGA concepts as edits of the edit stage: ``edit.directions: [sega/<concept>, ...]``.

A SEGA concept (:mod:`hmine.sega`) is not a vector in h: it guides the U-Net's output
with an editing prompt. The edit stage still sweeps it like a direction: at signed scale
s the seeds are sampled again with concept ``<concept>`` of ``edit.sega`` at ``|s|`` times
its ``guidance_scale``, reversed below 0 (:func:`hmine.sega.sega_edit`), on the seeds' own
trajectories and prompts, so the effects table, the strips and matched strength
(:mod:`hmine.strength`, which reads the attribute from the name: ``sega/is_red`` is about
``is_red``) measure it as they measure h-space directions. Scale 0 is the stored sample.

What the edit window does not touch: SEGA applies a concept from its own
``warmup_steps`` to its ``cooldown_steps``; ``edit.t_edit``, ``edit.t_edit_max`` and
``edit.asymmetric`` are h-space settings and leave SEGA's edits as they are.

Refused (one line naming the field, before anything is written): ``sega/`` names without an
``edit.sega`` section or naming a concept it lacks, a concept whose ``warmup_steps`` is not
below ``sample.num_inference_steps`` (it would never be applied: SEGA's default 10 at 10
steps left the images unedited), on a model without ``sample.text``,
at ``sample.text.guidance_scale`` 1 (SEGA guides relative to the unconditional branch, which
classifier-free guidance computes), with ``edit.source: inversions`` (SEGA samples from a
seed and its prompt) and with ``edit.t_boost`` (boosting redraws the noise of the last
steps, which :func:`hmine.sega.sample_sega` does not).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from hmine.edit_names import parse_edit, term_names
from hmine.sega_config import check_warmup_applies

SEGA_PREFIX = "sega/"


def is_sega(name: str) -> bool:
    """Whether an ``edit.directions`` name is a SEGA concept."""
    return name.startswith(SEGA_PREFIX)


def sega_concept(name: str) -> str:
    """The concept of ``sega/<concept>``."""
    return name[len(SEGA_PREFIX):]


def check_sega_edits(config) -> None:
    """Refuse ``sega/`` names of ``edit.directions`` that cannot be applied (module docstring).

    Raises
    ------
    ValueError
        One line naming the field and the fix.
    """
    edit = config.edit
    names = [n for n in term_names(edit.directions) if is_sega(n)]  # the concepts of combinations too
    if not names:
        return
    if edit.sega is None:
        raise ValueError(
            f"edit.directions names {names}, but there is no edit.sega section; add edit.sega.concepts "
            "with an editing prompt per concept"
        )
    unknown = [n for n in names if sega_concept(n) not in edit.sega.concepts]
    if unknown:
        raise ValueError(
            f"edit.directions names {unknown}, which edit.sega.concepts lacks (it has "
            f"{sorted(edit.sega.concepts)}); add the concept or fix the name"
        )
    for concept in sorted({sega_concept(n) for n in names}):
        check_warmup_applies(edit.sega.concepts[concept].warmup_steps, config.sample.num_inference_steps,
                             f"edit.sega.concepts.{concept}.warmup_steps", "sample.num_inference_steps")  # fmt: skip
    text = config.sample.text
    if text is None:
        raise ValueError(
            f"edit.directions names SEGA concepts {names}, which need a text-conditional model: model.id "
            f"{config.model.id!r} has no sample.text; use a text-to-image model or remove the sega/ names"
        )
    if not text.guided:
        raise ValueError(
            "edit.directions names SEGA concepts, which guide against the unconditional branch of "
            "classifier-free guidance: sample.text.guidance_scale is 1; set it to another value (e.g. 4)"
        )
    if edit.source == "inversions":
        raise ValueError(
            "edit.source is 'inversions' but SEGA concepts (sega/...) sample from a seed and its prompt; "
            "edit samples (edit.source: samples) or remove the sega/ names from edit.directions"
        )
    if edit.t_boost is not None:
        raise ValueError(
            "edit.t_boost is set but SEGA concepts (sega/...) are sampled without quality boosting; "
            "remove edit.t_boost or the sega/ names from edit.directions"
        )


def check_sega_prompts(sampler, config) -> None:
    """Refuse an editing prompt of ``edit.sega`` over the tokenizer's limit (one line naming it)."""
    for concept in {sega_concept(n) for n in term_names(config.edit.directions) if is_sega(n)}:
        sampler.text.embed(config.edit.sega.concepts[concept].prompt, f"edit.sega.concepts.{concept}.prompt")


def sega_scale_images(
    sampler, keys: Sequence[int], sega, entry: str, scales: Sequence[float], batch_size: int
) -> Iterator[tuple[int, np.ndarray]]:
    """(index into ``scales``, images of every key) for each scale != 0, by :func:`hmine.sega.sega_edit`.

    ``entry`` is ``sega/<concept>`` or a combination of concepts, ``sega/a + 0.5*sega/b``
    (:mod:`hmine.edit_names`): at scale s every concept at once, each at signed scale w x s.

    The keys are seeds; ``batch_size`` of them share one SEGA call (of three U-Net branches
    each: unconditional, conditional and the concept's).
    """
    from hmine.sega import sega_edit

    concepts = [(sega_concept(term.name), term.weight) for term in parse_edit(entry)]
    for s, scale in enumerate(scales):
        if scale == 0.0:
            continue
        chunks = [keys[i : i + batch_size] for i in range(0, len(keys), batch_size)]
        images = [sega_edit(sampler, chunk, sega, concepts, scale).images.float().cpu().numpy() for chunk in chunks]
        yield s, np.concatenate(images)
