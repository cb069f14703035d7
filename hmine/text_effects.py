"""S_dir of the text-driven edits: columns ``s_dir`` and ``s_dir_std`` of ``edit_effects.parquet``.

An edit is text-driven when a source and a target text say what it should do:

* ``learned/<t>``, ``learned-block-mean/<t>``, ``learned-block/<t>`` of a ``kind: clip``
  learn target: its ``source`` → ``target``, embedded by the target's CLIP;
* with a CLIP labeller (``label.labeller: clip``), a supervised direction of an attribute
  (``probe/smiling``, ``conditional/mean_difference/smiling|young``): the attribute's
  negative prompt → its positive prompt (``label.clip_prompts``), and a SEGA concept
  ``sega/<c>``: the empty prompt → the concept's prompt (SEGA guides along
  eps(concept) − eps(unconditional)), reversed for a ``reverse`` concept; both by
  ``label.clip_model_id``.

For each such direction and scale s ≠ 0, S_dir is the mean over the edited samples of
cos(E_I(image at s) − E_I(image at 0), E_T(target) − E_T(source))
(:func:`hmine.learning.losses.directional_similarity`), ``s_dir_std`` its std (ddof 1).
Rows of other directions, of combinations and of scale 0 hold NaN.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

S_DIR_COLUMNS = ("s_dir", "s_dir_std")
_BATCH = 64  # images embedded per CLIP call


@dataclass(frozen=True)
class TextPair:
    """What a text-driven edit should do: from ``source`` to ``target``, in the CLIP ``model_id``'s space."""

    source: str
    target: str
    model_id: str
    revision: str | None = None


def text_pairs(config, names) -> dict[str, TextPair]:
    """The text pair of each of ``names`` that is text-driven (module docstring)."""
    from hmine.edit_names import is_plain
    from hmine.learning.edit_directions import learned_prefix
    from hmine.sega_edits import is_sega, sega_concept
    from hmine.strength import direction_attribute

    label, targets, pairs = config.label, {t.name: t for t in config.learn.targets}, {}
    for name in names:
        if not is_plain(name):  # a combination or a direction global at t: no one pair of texts
            continue
        prefix = learned_prefix(name)
        if prefix is not None:
            target = targets.get(name[len(prefix) :])
            if target is not None and target.kind == "clip":
                pairs[name] = TextPair(target.source, target.target, target.clip_model_id, target.clip_revision)
        elif label.labeller != "clip":
            continue
        elif is_sega(name) and config.edit.sega is not None and sega_concept(name) in config.edit.sega.concepts:
            concept = config.edit.sega.concepts[sega_concept(name)]
            texts = (concept.prompt, "") if concept.reverse else ("", concept.prompt)
            pairs[name] = TextPair(*texts, label.clip_model_id, label.clip_revision)
        elif name.split("/")[0] in _SUPERVISED and direction_attribute(name) in label.clip_prompts:
            positive, negative = label.clip_prompts[direction_attribute(name)]
            pairs[name] = TextPair(negative, positive, label.clip_model_id, label.clip_revision)
    return pairs


_SUPERVISED = ("mean_difference", "probe", "conditional", "regression")  # hmine.stages.edit.SUPERVISED_METHODS


def directional_effects(group, names, scales, pairs: dict[str, TextPair], device: str = "cpu") -> pd.DataFrame:
    """Rows (direction, scale, s_dir, s_dir_std) of the edit store ``group``'s text-driven directions."""
    from hmine.learning.losses import ClipEmbedder, directional_similarity

    zero, embedders, rows = list(scales).index(0.0), {}, []
    for d, name in enumerate(names):
        pair = pairs.get(name)
        if pair is None:
            continue
        key = (pair.model_id, pair.revision)
        if key not in embedders:
            embedders[key] = ClipEmbedder(pair.model_id, pair.revision, device)
        edited = np.asarray(group["edited"][d], dtype=bool) if "edited" in group else slice(None)
        before = np.asarray(group["images"][d, zero])[edited]
        for s, scale in enumerate(scales):
            if s == zero:
                continue
            after = np.asarray(group["images"][d, s])[edited]
            cosines = np.concatenate([
                directional_similarity(embedders[key], before[i : i + _BATCH], after[i : i + _BATCH], pair.source, pair.target)[2]
                for i in range(0, len(before), _BATCH)
            ])  # fmt: skip
            std = float(cosines.std(ddof=1)) if len(cosines) > 1 else float("nan")
            rows.append({"direction": name, "scale": float(scale), "s_dir": float(cosines.mean()), "s_dir_std": std})
    return pd.DataFrame(rows, columns=["direction", "scale", *S_DIR_COLUMNS])


def with_directional_similarity(effects: pd.DataFrame, group, names, scales, config) -> pd.DataFrame:
    """``effects`` with the columns ``s_dir`` and ``s_dir_std`` (NaN where the edit is not text-driven)."""
    table = directional_effects(group, names, scales, text_pairs(config, names), config.model.device)
    return effects.merge(table, on=["direction", "scale"], how="left")


def s_dir_html(effects: pd.DataFrame) -> str:
    """The report's S_dir table (mean ± std per direction and scale), or "" without text-driven edits."""
    if "s_dir" not in effects or not effects["s_dir"].notna().any():
        return ""
    rows = effects.dropna(subset=["s_dir"]).drop_duplicates(["direction", "scale"])
    table = rows.pivot(index="direction", columns="scale", values="s_dir").map("{:+.3f}".format)
    table = table + " ± " + rows.pivot(index="direction", columns="scale", values="s_dir_std").map("{:.3f}".format)
    table.columns = [f"{c:+g}" for c in table.columns]
    return ("<h3>Directional CLIP similarity S_dir (text-driven edits)</h3><p>Mean ± std over the edited images of "
            "cos(E_I(edited) − E_I(unedited), E_T(target) − E_T(source)), per scale (hmine.text_effects).</p>"
            + table.to_html())  # fmt: skip
