"""S_dir in the effects table and the report: text-driven edits (CLIP learn targets, CLIP-labelled directions)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from test_learned_edits import run_through_learned_edit
from test_learning import _hand_clip, _hand_cosines

from hmine.config import load_config
from hmine.stages.edit import EFFECTS_TABLE
from hmine.stores import open_group
from hmine.text_effects import TextPair, s_dir_html, text_pairs

LEARN_TEXTS = ("a shape", "a red shape")
PROMPTS = ("a red thing", "a thing")  # label.clip_prompts: [positive, negative]
NAMES = ["learned/smile", "learned-block/smile", "probe/redness", "pca/0", "learned/smile - 0.5*probe/redness"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_clip_dir):
    target = {
        "name": "smile",
        "kind": "clip",
        "source": LEARN_TEXTS[0],
        "target": LEARN_TEXTS[1],
        "clip_model_id": str(tiny_clip_dir),
    }
    config = load_config(None, [
        f"output_root={tmp_path_factory.mktemp('s-dir')}", "name=t", "sample.n_samples=8", "sample.batch_size=8",
        "sample.num_inference_steps=3", "label.labeller=clip", f"label.clip_model_id={tiny_clip_dir}",
        "label.attributes=[redness]", f"label.clip_prompts={json.dumps({'redness': list(PROMPTS)})}",
        f"learn.targets={json.dumps([target])}", "learn.steps=2", "learn.batch_size=2", "learn.n_train=3",
        "learn.time_embedding_dim=8", "directions.pca_components=2", "edit.n_samples=4", "edit.scales=[-2,1.5]",
        "edit.batch_size=8", f"edit.directions={json.dumps(NAMES)}",
    ])  # fmt: skip
    return run_through_learned_edit(config)


def test_text_pairs_of_learned_clip_targets_clip_labelled_directions_and_sega_concepts(run, tiny_clip_dir):
    pairs = text_pairs(run, NAMES)
    assert pairs == {"learned/smile": TextPair(*LEARN_TEXTS, str(tiny_clip_dir)),
                     "learned-block/smile": TextPair(*LEARN_TEXTS, str(tiny_clip_dir)),
                     "probe/redness": TextPair(PROMPTS[1], PROMPTS[0], str(tiny_clip_dir))}  # fmt: skip
    sega = {"concepts": {"glasses": {"prompt": "glasses"}, "away": {"prompt": "hat", "reverse": True}}}
    with_sega = load_config(None, [f"output_root={run.output_root}", "label.labeller=clip", f"label.clip_model_id={tiny_clip_dir}",
                                   "label.attributes=[redness]", f"label.clip_prompts={json.dumps({'redness': list(PROMPTS)})}",
                                   f"edit.sega={json.dumps(sega)}"])  # fmt: skip
    assert text_pairs(with_sega, ["sega/glasses", "sega/away"]) == {
        "sega/glasses": TextPair("", "glasses", str(tiny_clip_dir)), "sega/away": TextPair("hat", "", str(tiny_clip_dir))}  # fmt: skip
    assert text_pairs(run, ["probe/redness - 0.5*pca/0", "probe/redness@t0"]) == {}  # no one pair of texts
    world = load_config(None, [f"output_root={run.output_root}"])  # the world classifier: no text but learn targets'
    assert text_pairs(world, ["probe/is_red"]) == {}


def test_s_dir_of_the_effects_table_is_the_hand_computed_mean_and_std(run, tiny_clip_dir):
    effects = pd.read_parquet(run.run_dir / EFFECTS_TABLE)
    per_scale = effects.drop_duplicates(["direction", "scale"]).set_index(["direction", "scale"])
    edits = open_group(run.run_dir / "edits.zarr")
    scales = [float(s) for s in edits["scale"][...]]
    checked = 0
    for d, name in enumerate(NAMES):
        for s, scale in enumerate(scales):
            row = per_scale.loc[(name, scale)]
            if scale == 0.0 or name not in ("learned/smile", "learned-block/smile", "probe/redness"):
                assert np.isnan(row["s_dir"]) and np.isnan(row["s_dir_std"])
                continue
            texts = list(LEARN_TEXTS) if name.startswith("learned") else [PROMPTS[1], PROMPTS[0]]
            before, after = edits["images"][d, scales.index(0.0)], edits["images"][d, s]
            assert np.abs(after - before).max() > 1e-4  # an edit, not the originals
            hand = _hand_cosines(*_hand_clip(tiny_clip_dir, texts, before, after))
            assert row["s_dir"] == pytest.approx(hand.mean(), abs=1e-5)
            assert row["s_dir_std"] == pytest.approx(hand.std(ddof=1), abs=1e-5)
            checked += 1
    assert checked == 6
    # every attribute's row of a (direction, scale) carries the same S_dir
    assert (effects.groupby(["direction", "scale"])["s_dir"].nunique(dropna=False) == 1).all()


def test_the_report_shows_s_dir_with_its_std(run):
    effects = pd.read_parquet(run.run_dir / EFFECTS_TABLE)
    page = s_dir_html(effects)
    value = effects.set_index(["direction", "scale"]).loc[("probe/redness", 1.5), "s_dir"]
    assert "S_dir" in page and "probe/redness" in page and f"{float(np.atleast_1d(value)[0]):+.3f} ± " in page
    assert "pca/0" not in page
    assert s_dir_html(effects.drop(columns=["s_dir", "s_dir_std"])) == ""
