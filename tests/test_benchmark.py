"""The ground-truth benchmark: the table from planted effects tables, and one small run of the stage on the embedded world."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from hmine.benchmark.candidates import Candidate, jacobian_candidates, norm_per_scale, random_candidate, sign_aligned
from hmine.benchmark.measure import signed_scales
from hmine.benchmark.table import benchmark_table, best_per_attribute, match_components, slopes

SCALES = [-20.0, -10.0, 0.0, 10.0, 20.0]


def planted(flips: dict, changes: dict, quality=(0.0, 0.0), lowers=()) -> pd.DataFrame:
    """An effects table: ``flips[attribute] = (rate at 10, rate at 20)`` on both sides (NaN: not binary),
    positive scales raising the attribute (lowering it for those in ``lowers``),
    ``changes[attribute] = mean_change_std per unit of scale``; leakage ``changed_decision`` 0.05 at |s| 10, 0.2 at 20."""
    rows = []
    for scale in SCALES:
        for attribute in sorted(set(flips) | set(changes)):
            rate = np.interp(abs(scale), [0, 10, 20], [0, *flips[attribute]]) if attribute in flips else np.nan
            raising = scale if attribute not in lowers else -scale
            rows.append({
                "direction": "d", "scale": scale, "attribute": attribute, "mean_score": 0.0, "mean_change": 0.0,
                "mean_change_std": changes.get(attribute, 0.0) * scale,
                "flip_to_positive": rate if raising > 0 else (0.0 if attribute in flips else np.nan),
                "flip_to_negative": rate if raising < 0 else (0.0 if attribute in flips else np.nan),
                "changed_decision": np.interp(abs(scale), [0, 10, 20], [0, 0.05, 0.2]) if attribute in flips else np.nan,
                "confident_share": 1.0 - abs(scale) / 40, "frechet_distance": quality[0] + quality[1] * abs(scale),
            })  # fmt: skip
    return pd.DataFrame(rows)


def candidate(name, method, attribute, scale_unit=1.0, steps=2):
    return Candidate(name, method, attribute, np.zeros((steps, 1, 1, 1), np.float32), np.full(steps, scale_unit))


def test_match_components_takes_the_factor_each_moves_most_with_its_sign():
    effects = {
        "pca/0": planted({"a": (0, 0), "b": (0.5, 1)}, {"a": 0.01, "b": -0.08}),  # moves b, downwards
        "pca/1": planted({"a": (0.5, 1), "b": (0, 0)}, {"a": 0.03, "b": 0.0}),
        "pca/2": planted({"a": (0.5, 1), "b": (0, 0)}, {"a": 0.05, "b": 0.01}),  # a again, more
    }
    # (change at +s - change at -s) / 2 = c s, averaged over s = 10, 20: 15 c
    assert slopes(effects["pca/0"], ["a", "b"]).to_dict() == pytest.approx({"a": 0.15, "b": -1.2})
    assert match_components(effects, ["a", "b"]) == {"a": ("pca/2", 1.0), "b": ("pca/0", -1.0)}


def test_benchmark_table_from_planted_effects():
    binary, continuous = ["a", "b"], ["size", "x"]
    candidates = [candidate("probe/a", "probe", "a", 2.0), candidate("pca/0", "pca", None, 4.0)]
    candidates.append(random_candidate(candidates, seed=0, shape=(2, 1, 1, 1)))
    effects = {
        # 90 % of a flips at |s| = 10 + (0.9 - 0.6) / 0.4 * 10 = 17.5; size (a's own factor) moves, x barely
        "probe/a": planted({"a": (0.6, 1.0), "b": (0, 0)}, {"size": 0.05, "x": 0.005}, quality=(1.0, 0.5)),
        # pca/0 lowers b: its "+" side for b is its "-" side, flipping 90 % at 10 * 0.9 / 0.95
        "pca/0": planted({"a": (0, 0), "b": (0.95, 1.0)}, {"b": -0.1}, lowers=("b",)),
        "random": planted({"a": (0.1, 0.3), "b": (0.0, 0.1)}, {}),
    }
    norms = {c.name: norm_per_scale(c, [True, True]) for c in candidates}
    assert norms == {"probe/a": 2.0, "pca/0": 4.0, "random": 4.0}  # random: the largest scale unit
    table = benchmark_table(candidates, effects, norms, binary, continuous, {"a": "size"}).set_index(["method", "attribute", "side"])

    probe = table.loc[("probe", "a", "+")]
    assert probe["reached"] and probe["scale"] == pytest.approx(17.5) and probe["norm"] == pytest.approx(35.0)
    assert probe["leak_decision"] == pytest.approx(0.05 + 0.75 * 0.15)  # b's changed decisions at 17.5
    assert probe["leak_continuous"] == pytest.approx(0.005 * 17.5)  # x only: size is a's own factor
    assert probe["frechet_distance"] == pytest.approx(1.0 + 0.5 * 17.5)
    assert probe["confident_share"] == pytest.approx(1 - 17.5 / 40)
    # the random direction at norm 35 is at its scale 35 / 4 = 8.75: rate 0.1 * 8.75 / 10
    assert probe["random_rate_at_norm"] == pytest.approx(0.0875)
    assert probe["margin"] == pytest.approx(0.9 - 0.0875)
    assert table.loc[("probe", "a", "-"), "scale"] == pytest.approx(-17.5)

    pca = table.loc[("pca", "b", "+")]
    assert pca["direction"] == "-pca/0" and pca["scale"] == pytest.approx(10 * 0.9 / 0.95)
    assert pca["norm"] == pytest.approx(4.0 * 10 * 0.9 / 0.95)
    assert ("pca", "a", "+") not in table.index  # no component is matched to a

    # the random baseline is read against every attribute and reaches neither
    assert not table.loc[("random", "a", "+"), "reached"] and table.loc[("random", "b", "-"), "best_rate"] == pytest.approx(0.1)
    assert np.isnan(table.loc[("random", "a", "+"), "margin"])
    # clean: the probe changes 0.1625 > 0.1 of b's decisions; pca/0 flips b at 9.47 with 0.047 of a's changed
    assert table.index[table["clean"]].tolist() == [("pca", "b", "+"), ("pca", "b", "-")]
    best = best_per_attribute(table.reset_index()).set_index(["attribute", "side"])
    assert best.loc[("a", "+"), "method"] == "probe" and best.loc[("b", "+"), "method"] == "pca"


def test_jacobian_candidates_are_each_images_vectors_sign_aligned_with_their_own_scale_units():
    import xarray as xr

    rng = np.random.default_rng(3)
    n, steps, shape = 3, [30, 20, 10], (2, 2, 2)
    vectors = rng.standard_normal((n, 1, 2, *shape))  # (sample, analysed step, k, ...)
    vectors /= np.linalg.norm(vectors.reshape(n, 1, 2, -1), axis=-1).reshape(n, 1, 2, 1, 1, 1)
    vectors[1, 0, 0] *= -1 if (vectors[1, 0, 0] * vectors[0, 0, 0]).sum() > 0 else 1  # sample 1 opposes sample 0
    group = {"sample": np.array([7, 8, 9]), "step": np.array([20]), "vectors": vectors}
    h = xr.DataArray(rng.standard_normal((40, len(steps), *shape)), dims=("sample", "step", "channel", "y", "x"))
    found = jacobian_candidates(group, steps, h)
    assert [(c.name, c.method, c.attribute, c.seeds) for c in found] == [
        ("jacobian/masked/0@t20", "jacobian/masked", None, (7, 8, 9)),
        ("jacobian/masked/1@t20", "jacobian/masked", None, (7, 8, 9)),
    ]
    first = found[0]
    assert first.unit.shape == (n, len(steps), *shape) and first.scale_unit.shape == (n, len(steps))
    for i in range(n):  # the vector of step 20 at every step, turned towards sample 0's
        sign = np.sign((vectors[i, 0, 0] * vectors[0, 0, 0]).sum())
        np.testing.assert_allclose(first.unit[i], np.repeat(sign * vectors[i, 0, 0][None], len(steps), axis=0), rtol=1e-6)
        for t in range(len(steps)):  # the std over the samples of h projected on it (ddof 1)
            projections = h.values[:, t].reshape(40, -1) @ first.unit[i, t].ravel()
            assert first.scale_unit[i, t] == pytest.approx(projections.std(ddof=1), rel=1e-5)
    assert (first.unit[1, 0] * vectors[1, 0, 0]).sum() < 0  # turned
    assert np.all((sign_aligned(vectors[:, 0, 0]).reshape(n, -1) @ sign_aligned(vectors[:, 0, 0])[0].ravel()) >= 0)
    # its norm per scale: the rms over the seeds and edited steps; the random baseline spans its largest
    assert norm_per_scale(first, [True, False, True]) == pytest.approx(np.sqrt(np.mean(first.scale_unit[:, [0, 2]] ** 2)))
    assert random_candidate(found, 0).scale_unit == pytest.approx(np.max([c.scale_unit.max(0) for c in found], axis=0))


def test_per_image_families_are_matched_like_pca_and_too_few_samples_are_not_ranked():
    binary = ["a", "b"]
    candidates = [candidate("probe/a", "probe", "a"), candidate("jacobian/masked/0@t20", "jacobian/masked", None),
                  candidate("jacobian/masked/1@t20", "jacobian/masked", None)]  # fmt: skip
    effects = {
        "probe/a": planted({"a": (0.6, 1.0), "b": (0.2, 0.3)}, {"a": 0.05}),
        "jacobian/masked/0@t20": planted({"a": (0.0, 0.0), "b": (1.0, 1.0)}, {"b": -0.1}, lowers=("b",)),
        "jacobian/masked/1@t20": planted({"a": (1.0, 1.0), "b": (0.0, 0.0)}, {"a": 0.1}),
    }
    norms = {c.name: 1.0 for c in candidates}
    counts = {"probe/a": 32, "jacobian/masked/0@t20": 4, "jacobian/masked/1@t20": 4}
    table = benchmark_table(candidates, effects, norms, binary, n_samples=counts).set_index(["method", "attribute", "side"])
    assert table.loc[("jacobian/masked", "b", "+"), "direction"] == "-jacobian/masked/0@t20"
    assert table.loc[("jacobian/masked", "a", "+"), "direction"] == "jacobian/masked/1@t20"
    assert table.loc[("jacobian/masked", "a", "+"), "n_samples"] == 4 and table.loc[("probe", "a", "+"), "n_samples"] == 32
    # the Jacobian flips a sooner and with less leakage, but on 4 samples: the probe is ranked
    best = best_per_attribute(table.reset_index()).set_index(["attribute", "side"])
    assert best.loc[("a", "+"), "method"] == "probe" and ("b", "+") not in best.index


def test_signed_scales_and_config_validation():
    from hmine.config import load_config

    assert signed_scales([10, 5, -5]) == [-10.0, -5.0, 0.0, 5.0, 10.0]
    assert load_config(None, ["benchmark.scales=[-5, 10, 5]"]).benchmark.scales == [5.0, 10.0]
    with pytest.raises(Exception, match="benchmark.scales must be non-zero"):
        load_config(None, ["benchmark.scales=[0, 5]"])


@pytest.fixture(scope="module")
def world_benchmark(tmp_path_factory):
    from hmine.config import load_config
    from hmine.pipeline import run_stage

    root = tmp_path_factory.mktemp("benchmark")
    config = load_config(
        None,
        [f"output_root={root}", "name=b", "sample.n_samples=48", "sample.batch_size=48", "sample.num_inference_steps=4",
         "label.attributes=[is_circle, is_red]", "directions.pca_components=2", "directions.pca_modes=[per_step]",
         "directions.top_k=12", "benchmark.n_samples=6", "benchmark.scales=[20, 40]", "benchmark.pca_components=2",
         "benchmark.batch_size=16", "jacobian.n_samples=2", "jacobian.k=2", "jacobian.steps=[500]",
         "jacobian.max_iter=15"],
    )  # fmt: skip
    for stage in ("sample", "label", "directions", "jacobian"):
        run_stage(stage, config)
    result = run_stage("benchmark", config)
    return config, result


@pytest.mark.slow  # a whole small run of the embedded world (about 2 minutes on the loaded 2-core machine)
def test_the_benchmark_stage_on_the_embedded_world(world_benchmark):
    from hmine.stages import applicable_stage_names, up_to_date
    from hmine.stages.benchmark import read_benchmark

    config, result = world_benchmark
    assert result["computed"] == 1
    table = read_benchmark(config.run_dir)
    assert set(table["attribute"]) == {"is_circle", "is_red"} and set(table["side"]) == {"-", "+"}
    assert {"mean_difference", "probe", "regression", "random"} <= set(table["method"])
    jacobian = table[table["method"] == "jacobian/masked"]  # each of the 2 analysed samples along its own vectors
    assert len(jacobian) and (jacobian["n_samples"] == 2).all() and (table.loc[table["method"] == "probe", "n_samples"] == 6).all()
    assert set(jacobian["direction"].str.lstrip("-")) <= {"jacobian/masked/0@t500", "jacobian/masked/1@t500"}
    assert set(table.loc[table["method"] == "pca", "direction"].str.lstrip("-")) <= {"pca/0", "pca/1"}
    for (method, _), rows in table.groupby(["method", "attribute"]):
        # both sides of every (method, attribute); 2 analysed samples may have no far side on one
        assert len(rows) == 2 or (method.startswith("jacobian/") and len(rows) == 1)
    reached = table[table["reached"]]
    assert len(reached) and (reached["norm"] > 0).all() and reached["frechet_distance"].notna().all()
    assert reached["confident_share"].between(0, 1).all() and reached["best_rate"].ge(0.9).all()
    assert table[["changed_decision:is_red", "mean_change_std:size"]].shape[1] == 2  # per-attribute leakage kept
    assert up_to_date(config, "benchmark") and "benchmark" in applicable_stage_names(config)  # ran here once
    assert (config.run_dir / "benchmark_sweep.png").stat().st_size > 1000  # every direction x every scale, sample 0


@pytest.mark.slow  # a whole small run of the embedded world (about 2 minutes on the loaded 2-core machine)
def test_a_rerun_computes_nothing_and_the_report_section_draws_the_heat_maps(world_benchmark, tmp_path):
    from hmine.benchmark.report import benchmark_section
    from hmine.pipeline import run_stage

    config, _ = world_benchmark
    assert run_stage("benchmark", config)["computed"] == 0
    section = benchmark_section(config, config.run_dir, tmp_path)
    assert (tmp_path / "benchmark.png").stat().st_size > 1000
    assert "Best direction per attribute and side" in section and "random" in section
    assert (tmp_path / "benchmark_sweep.png").exists() and "benchmark_sweep.png" in section


def test_the_benchmark_refuses_a_clip_run(tmp_path):
    from hmine.config import load_config
    from hmine.stages.benchmark import check_benchmark

    config = load_config(None, [f"output_root={tmp_path}", "label.labeller=clip", "label.attributes=[smiling]",
                                "label.clip_prompts={smiling: [a smiling face, a face]}"])  # fmt: skip
    with pytest.raises(ValueError, match="label.labeller is 'clip'"):
        check_benchmark(config)
