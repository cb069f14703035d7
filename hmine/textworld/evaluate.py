"""Prompt-following of the text-conditional world model, measured by the world classifier.

For each factor, ``n`` samples are drawn from prompts that name that factor alone
(``"a red shape"``, ``"a circle"``, ``"a shape at the left"``, ...; the factor's words in
turn, so each word gets ``n / words`` samples) with classifier-free guidance, and the
embedded shapes-world classifier (:class:`hmine.labelling.WorldLabeller`) says whether each
image shows what the prompt named:

* ``shape``, ``color``: the classified class is the named one;
* ``size``, ``y``, ``x``, ``background`` (three words each, the thirds of the factor's
  range, :mod:`hmine.textworld.captions`): **bin agreement**, the classified value lies in
  the named third. For the outer words the classifier's binary attribute is also checked
  (**side agreement**: "large" -> ``is_large``, "small" -> not ``is_large``, "top" ->
  ``is_top``, "left" -> ``is_left``, "light" -> ``is_light_bg``, ...; the world's
  thresholds are the middles of the ranges).

Optionally (``n_full``) also prompts naming all six factors at once, drawn from the world
(:func:`hmine.world.sample_factors`), with the agreement of each factor in them.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd

from hmine import world
from hmine.textworld import captions

# (binary attribute, True for the low word) of each continuous factor's outer words
SIDE_ATTRIBUTES = {
    "size": ("is_large", False),
    "y": ("is_top", True),
    "x": ("is_left", True),
    "background": ("is_light_bg", False),
}


def single_factor_plan(factor: str, n: int) -> list[tuple[int, str]]:
    """``(word index, prompt)`` of ``n`` samples naming ``factor`` alone, its words in turn."""
    words = captions.WORDS[factor]
    return [(i % len(words), captions.compose({factor: words[i % len(words)]})) for i in range(n)]


def agreement(table: pd.DataFrame, factor: str, word_index: np.ndarray) -> dict[str, np.ndarray]:
    """Per image: does the classifier agree with the named word of ``factor``?

    Returns ``{"agree": bool (n,), "side": float (n,) with nan where not an outer word}``;
    ``agree`` is the class match (discrete factors) or the bin agreement (continuous ones).
    """
    word_index = np.asarray(word_index)
    if factor in ("shape", "color"):
        return {"agree": table[factor].to_numpy().astype(int) == word_index, "side": np.full(len(word_index), np.nan)}
    agree = captions.factor_bin(factor, table[factor].to_numpy()) == word_index
    attribute, low_is_true = SIDE_ATTRIBUTES[factor]
    positive = table[attribute].to_numpy() > 0.5
    side = np.full(len(word_index), np.nan)
    side[word_index == 0] = positive[word_index == 0] == low_is_true
    side[word_index == 2] = positive[word_index == 2] != low_is_true
    return {"agree": agree, "side": side}


def evaluate(
    model,
    n: int = 512,
    *,
    factors: tuple[str, ...] = captions.FACTORS,
    n_full: int = 0,
    guidance_scale: float = 4.0,
    steps: int = 20,
    eta: float = 0.0,
    seed: int = 0,
    batch_size: int = 64,
    labeller=None,
) -> dict:
    """Agreement of the classifier with prompts naming single factors (and, with ``n_full``, all).

    Parameters
    ----------
    model : hmine.textworld.sampling.TextWorldModel
    n : int
        Samples per factor (split evenly over its words).
    n_full : int
        Samples from prompts naming all six factors (0: none).
    guidance_scale, steps, eta, seed, batch_size
        Sampler settings (:func:`hmine.textworld.sampling.sample`); factor ``k``'s samples
        use seed ``seed + k``.
    labeller : WorldLabeller, optional
        The embedded classifier, on the model's device, by default. The samples are drawn
        where the model is (:attr:`TextWorldModel.device`).

    Returns
    -------
    dict
        ``single``: per factor ``{"agreement", "side_agreement", "n", "words": {word:
        {"agreement", "side_agreement", "n"}}}``; ``full`` (with ``n_full``): per factor
        ``{"agreement", "n"}`` and ``all_factors`` (every factor right at once); the
        settings and ``seconds``.
    """
    from hmine.labelling import WorldLabeller
    from hmine.textworld.sampling import sample

    labeller = labeller or WorldLabeller(device=model.device)
    started = time.perf_counter()
    settings = dict(guidance_scale=guidance_scale, steps=steps, eta=eta, batch_size=batch_size)
    out: dict = {"n_per_factor": n, "seed": seed, **settings, "single": {}}
    for k, factor in enumerate(factors):
        plan = single_factor_plan(factor, n)
        images = sample(model, [p for _, p in plan], seed=seed + k, **settings)
        table = labeller.score(images)
        word_index = np.array([w for w, _ in plan])
        result = agreement(table, factor, word_index)
        entry = {
            "agreement": float(result["agree"].mean()),
            "side_agreement": _nanmean(result["side"]),
            "n": n,
            "words": {},
        }
        for i, word in enumerate(captions.WORDS[factor]):
            mine = word_index == i
            entry["words"][word] = {
                "agreement": float(result["agree"][mine].mean()) if mine.any() else float("nan"),
                "side_agreement": _nanmean(result["side"][mine]),
                "n": int(mine.sum()),
            }
        out["single"][factor] = entry
    if n_full:
        truth = world.sample_factors(n_full, seed=10**9 + seed)
        words = captions.factor_words(truth)
        prompts = [captions.caption(truth, i) for i in range(n_full)]
        table = labeller.score(sample(model, prompts, seed=seed + 100, **settings))
        full, everything = {}, np.ones(n_full, dtype=bool)
        for factor in captions.FACTORS:
            agree = agreement(table, factor, words[factor])["agree"]
            everything &= agree
            full[factor] = {"agreement": float(agree.mean()), "n": n_full}
        full["all_factors"] = {"agreement": float(everything.mean()), "n": n_full}
        out["full"] = full
    out["seconds"] = round(time.perf_counter() - started, 1)
    return out


def _nanmean(values: np.ndarray) -> float:
    values = np.asarray(values, dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else float("nan")


def format_report(result: dict) -> str:
    """A plain-text table of :func:`evaluate`'s result."""
    lines = [
        f"prompt-following, {result['n_per_factor']} samples per factor, CFG {result['guidance_scale']}, "
        f"{result['steps']} DDIM steps, eta {result['eta']}",
        f"{'factor':<11} {'agreement':>9} {'side':>6}   per word (agreement)",
    ]
    for factor, entry in result["single"].items():
        words = "  ".join(f"{w} {e['agreement']:.3f}" for w, e in entry["words"].items())
        side = "" if np.isnan(entry["side_agreement"]) else f"{entry['side_agreement']:.3f}"
        lines.append(f"{factor:<11} {entry['agreement']:>9.3f} {side:>6}   {words}")
    if "full" in result:
        parts = "  ".join(f"{f} {e['agreement']:.3f}" for f, e in result["full"].items())
        lines.append(f"all six factors named ({result['full']['shape']['n']} samples): {parts}")
    lines.append(f"({result['seconds']} s)")
    return "\n".join(lines)


def classifier_ceiling(n: int = 2048, seed: int = 10**9 + 7, labeller=None) -> dict[str, dict[str, float]]:
    """The same agreement measured on ``n`` rendered world images against their true words.

    What a perfect model could score: the classifier's own error near the bin edges (and,
    for ``side``, near the world's thresholds) caps every factor's agreement.
    """
    from hmine.labelling import WorldLabeller

    labeller = labeller or WorldLabeller()
    batch = world.generate(n, seed=seed)
    table = labeller.score(batch.images)
    words = captions.factor_words(batch.factors)
    out = {}
    for factor in captions.FACTORS:
        result = agreement(table, factor, words[factor])
        out[factor] = {"agreement": float(result["agree"].mean()), "side_agreement": _nanmean(result["side"]), "n": n}
    return out
