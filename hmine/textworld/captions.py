"""Captions of shapes-world images, generated from the world's factors.

A caption names some of an image's factors with fixed words, e.g.
``"a large red circle at the top left on a dark background"``; the factors it leaves out
stay random, so the model learns each factor's words on their own and a prompt that names
only ``red`` leaves shape, size, position and background to the world's distribution.

Words
-----
``shape`` and ``color`` are named by their class (:data:`hmine.world.SHAPES`,
:data:`hmine.world.COLORS`). Each continuous factor is cut into three equal bins over its
range and every bin has its own word (:data:`BIN_WORDS`):

==============  ==========================  =========================================
factor          words (low, mid, high bin)  range cut in thirds
==============  ==========================  =========================================
``size``        small, medium, large        half-extent [SIZE_MIN, SIZE_MAX] px
``y``           top, middle, bottom         centre row [SIZE_MIN + 1, 31 - SIZE_MIN] px
``x``           left, centre, right         centre column, the same range
``background``  dark, grey, light           grey level [BG_MIN, BG_MAX]
==============  ==========================  =========================================

So "large" means the top third of sizes, well past the world's ``is_large`` threshold
(the middle of the range): the classifier's binary attributes can check the extreme
words with a margin, and the middle words are learnt too.

Template: ``a [size] [color] (shape|"shape") [at the [y] [x]] [on a [background] background]``
with the unnamed parts dropped ("a red shape", "a circle at the left", "a shape on a dark
background"). The empty caption ``""`` is the unconditional one (caption dropout, for
classifier-free guidance).

Which factors a caption names is drawn per image from a generator seeded by the training
step (:func:`caption_batch`), so a resumed run sees the captions an uninterrupted run saw.
"""

from __future__ import annotations

import numpy as np

from hmine import world

FACTORS = ("size", "color", "shape", "y", "x", "background")
"""Factors a caption can name, in the order they appear in it."""

BIN_WORDS: dict[str, tuple[str, str, str]] = {
    "size": ("small", "medium", "large"),
    "y": ("top", "middle", "bottom"),
    "x": ("left", "centre", "right"),
    "background": ("dark", "grey", "light"),
}
"""Words of the three bins (low, middle, high value) of each continuous factor."""

_POSITION_LOW = world.SIZE_MIN + 1.0
_POSITION_HIGH = world.IMAGE_SIZE - world.SIZE_MIN - 1.0
BIN_RANGES: dict[str, tuple[float, float]] = {
    "size": (world.SIZE_MIN, world.SIZE_MAX),
    "y": (_POSITION_LOW, _POSITION_HIGH),
    "x": (_POSITION_LOW, _POSITION_HIGH),
    "background": (world.BG_MIN, world.BG_MAX),
}
"""The range of each continuous factor; its bins are the thirds of it."""

WORDS: dict[str, tuple[str, ...]] = {
    "shape": tuple(world.SHAPES),
    "color": tuple(world.COLORS),
    **BIN_WORDS,
}
"""Every factor's words; index i is class i (discrete) or bin i (continuous)."""

FILLER_WORDS = ("a", "shape", "at", "the", "on", "background")
"""The template's own words."""


def vocabulary() -> list[str]:
    """Every word a caption can contain, sorted (the tokenizer's whole-word tokens)."""
    words = set(FILLER_WORDS)
    for names in WORDS.values():
        words.update(names)
    return sorted(words)


def bin_edges(factor: str) -> tuple[float, float]:
    """The two inner edges of a continuous factor's three bins."""
    low, high = BIN_RANGES[factor]
    return low + (high - low) / 3.0, low + 2.0 * (high - low) / 3.0


def factor_bin(factor: str, values) -> np.ndarray:
    """Bin index (0 low, 1 middle, 2 high) of each value of a continuous factor."""
    lo, hi = bin_edges(factor)
    values = np.asarray(values, dtype=np.float64)
    return (values >= lo).astype(np.int64) + (values >= hi).astype(np.int64)


def factor_words(factors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The word index of every factor of every image: ``{factor: int array (n,)}``."""
    out = {"shape": np.asarray(factors["shape"], dtype=np.int64), "color": np.asarray(factors["color"], dtype=np.int64)}
    for factor in BIN_WORDS:
        out[factor] = factor_bin(factor, factors[factor])
    return out


def compose(named: dict[str, str]) -> str:
    """The caption naming exactly the given factors: ``{factor: word}`` -> text.

    ``compose({})`` is ``""`` (the unconditional caption); ``compose({"color": "red"})`` is
    ``"a red shape"``.
    """
    unknown = set(named) - set(FACTORS)
    if unknown:
        raise ValueError(f"unknown factors {sorted(unknown)}; known: {list(FACTORS)}")
    for factor, word in named.items():
        if word not in WORDS[factor]:
            raise ValueError(f"{word!r} is not a word of {factor}; its words: {list(WORDS[factor])}")
    if not named:
        return ""
    parts = ["a"]
    if "size" in named:
        parts.append(named["size"])
    if "color" in named:
        parts.append(named["color"])
    parts.append(named.get("shape", "shape"))
    if "y" in named or "x" in named:
        parts += ["at", "the"] + [named[f] for f in ("y", "x") if f in named]
    if "background" in named:
        parts += ["on", "a", named["background"], "background"]
    return " ".join(parts)


def caption(factors: dict[str, np.ndarray], index: int, named: tuple[str, ...] | list[str] = FACTORS) -> str:
    """The caption of image ``index`` of a factor batch, naming the factors in ``named``."""
    words = factor_words({k: np.asarray(v)[index : index + 1] for k, v in factors.items()})
    return compose({f: WORDS[f][int(words[f][0])] for f in named})


def caption_batch(
    factors: dict[str, np.ndarray],
    seed: int,
    *,
    name_probability: float = 0.5,
    drop_probability: float = 0.1,
) -> tuple[list[str], np.ndarray]:
    """Captions of a batch, each naming a random subset of its image's factors.

    Parameters
    ----------
    factors : dict of str to ndarray (n,)
        As :func:`hmine.world.sample_factors` returns them.
    seed : int
        Seeds the draws (which factors each caption names, which captions are dropped);
        the same (factors, seed) always gives the same captions.
    name_probability : float, default=0.5
        Each factor is named with this probability, independently of the others.
    drop_probability : float, default=0.1
        A caption is replaced by ``""`` with this probability (caption dropout, so the
        model also learns the unconditional distribution that classifier-free guidance
        needs). A caption whose draw named no factor is ``""`` as well.

    Returns
    -------
    captions : list of str
    named : ndarray of bool, shape (n, len(FACTORS))
        Which factors each caption names (all False for ``""``).
    """
    n = len(factors["shape"])
    rng = np.random.default_rng([int(seed), 0x7E57])
    named = rng.random((n, len(FACTORS))) < name_probability
    dropped = rng.random(n) < drop_probability
    named[dropped] = False
    words = factor_words(factors)
    captions = []
    for i in range(n):
        captions.append(compose({f: WORDS[f][int(words[f][i])] for j, f in enumerate(FACTORS) if named[i, j]}))
    return captions, named


def single_factor_prompts() -> list[tuple[str, str, str]]:
    """``(factor, word, prompt)`` for every word of every factor, one factor named per prompt."""
    return [(factor, word, compose({factor: word})) for factor in FACTORS for word in WORDS[factor]]
