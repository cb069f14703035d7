"""The Jacobian stage on a tiny model: store layout, masks from files, resume, bad masks."""

import numpy as np
import pytest
import xarray as xr

from hmine.config import load_config
from hmine.jacobian import principal_angles_degrees
from hmine.report import jacobian_summary
from hmine.stages.jacobian import run_jacobian_stage
from hmine.stages.sample import run_sample_stage
from hmine.stores import open_group


def _config(model_dir, root, *extra):
    return load_config(
        None,
        [f"model.id={model_dir}", f"output_root={root}", "name=j", "sample.n_samples=6", "sample.batch_size=3",
         "sample.num_inference_steps=3", "jacobian.n_samples=2", "jacobian.k=2", "jacobian.steps=[333]",
         "jacobian.tol=1e-3", "jacobian.max_iter=60", *extra],
    )


def _left_half_masks(tmp_path):
    """A mask folder for samples 0 and 1: the left half of the 16x16 image; (folder, mask)."""
    masks = tmp_path / "masks"
    masks.mkdir()
    left = np.zeros((16, 16), dtype=np.float32)
    left[:, :8] = 1
    for seed in range(2):
        np.save(masks / f"{seed}.npy", left)
    return masks, left


def test_store_layout_and_resume(tiny_pixel_model_dir, tmp_path):
    config = _config(tiny_pixel_model_dir, tmp_path)
    run_sample_stage(config, show_progress=False)
    first = run_jacobian_stage(config, show_progress=False)
    assert first.computed == 2
    ds = xr.open_zarr(config.run_dir / "jacobian.zarr", consolidated=False)
    assert ds["vectors"].dims == ("sample", "step", "k", "channel", "y", "x")
    assert ds["vectors"].shape == (2, 1, 2, 16, 8, 8)
    norms = np.sqrt((ds["vectors"].values.reshape(2, 1, 2, -1) ** 2).sum(-1))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    sv = ds["singular_values"].values
    assert (sv[..., 0] >= sv[..., 1]).all() and (sv > 0).all()
    assert list(ds["step"].values) == [333]
    # un-mark one (sample, step): only that one is recomputed, to the same answer (it was
    # solved beside sample 0 and now alone: equal to rounding, not bit for bit)
    group = open_group(config.run_dir / "jacobian.zarr", mode="r+")
    reference = group["vectors"][...]
    group["done"][1, 0] = False
    del group.attrs["hmine:complete"]
    again = run_jacobian_stage(config, show_progress=False)
    assert again.computed == 1 and again.skipped == 1
    resumed = open_group(config.run_dir / "jacobian.zarr")["vectors"][...]
    np.testing.assert_array_equal(resumed[0], reference[0])  # the done pair is not touched
    np.testing.assert_allclose(resumed, reference, atol=1e-5)
    assert principal_angles_degrees(resumed[1, 0], reference[1, 0]).max() < 0.01
    # a changed Jacobian config makes the store stale: it is recomputed, not refused
    changed = _config(tiny_pixel_model_dir, tmp_path, "jacobian.k=1")
    assert run_jacobian_stage(changed, show_progress=False).computed == 2
    assert open_group(config.run_dir / "jacobian.zarr")["vectors"].shape[2] == 1


def test_a_damaged_jacobian_chunk_is_detected_and_redone(tiny_pixel_model_dir, tmp_path):
    from hmine.stages import damaged_count

    config = _config(tiny_pixel_model_dir, tmp_path)
    run_sample_stage(config, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    path = config.run_dir / "jacobian.zarr"
    reference = open_group(path)["vectors"][...]
    (path / "vectors" / "c" / "0" / "0" / "0" / "0" / "0" / "0").unlink()
    assert not damaged_count(config, "jacobian") == 0
    again = run_jacobian_stage(config, show_progress=False)
    assert again.repaired == 1 and again.computed == 1 and again.skipped == 1
    assert damaged_count(config, "jacobian") == 0
    np.testing.assert_allclose(open_group(path)["vectors"][...], reference, atol=1e-6)


def test_an_empty_mask_gives_a_complete_intact_store(tiny_pixel_model_dir, tmp_path):
    """J is zero under an empty mask, so are its singular values: zarr writes no chunk
    equal to the fill value, and the loss check must not read that as damage."""
    from hmine.pipeline import stage_status
    from hmine.stages import damaged_count

    masks = tmp_path / "masks"
    masks.mkdir()
    np.save(masks / "0.npy", np.zeros((16, 16), dtype=np.float32))
    np.save(masks / "1.npy", np.ones((16, 16), dtype=np.float32))
    config = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=files", f"jacobian.mask_dir={masks}")
    run_sample_stage(config, show_progress=False)
    assert run_jacobian_stage(config, show_progress=False).computed == 2
    assert (open_group(config.run_dir / "jacobian.zarr")["singular_values"][0] == 0).all()
    assert damaged_count(config, "jacobian") == 0
    assert run_jacobian_stage(config, show_progress=False).computed == 0
    status = {s.stage: s.state for s in stage_status(config.run_dir, config)}
    assert status["jacobian"] == "complete"


def test_masks_from_files_change_the_directions_and_are_checked(tiny_pixel_model_dir, tmp_path):
    masks, left = _left_half_masks(tmp_path)
    plain = _config(tiny_pixel_model_dir, tmp_path / "a")
    masked = _config(tiny_pixel_model_dir, tmp_path / "b", "jacobian.mask=files", f"jacobian.mask_dir={masks}")
    for config in (plain, masked):
        run_sample_stage(config, show_progress=False)
        run_jacobian_stage(config, show_progress=False)
    a = open_group(plain.run_dir / "jacobian.zarr")
    b = open_group(masked.run_dir / "jacobian.zarr")
    np.testing.assert_array_equal(b["mask"][0], left)
    cos = abs((a["vectors"][0, 0, 0] * b["vectors"][0, 0, 0]).sum())
    assert cos < 0.99  # the mask matters
    frac = b["inside_mask_fraction"][...]
    assert np.isfinite(frac).all() and (frac >= 0).all() and (frac <= 1).all()
    # the masked objective puts more of eps's first-order change inside the mask than
    # the unmasked top direction does, and the localised direction more than either
    assert list(b["variant"][...]) == ["masked", "unmasked", "localised"]
    eps_frac = b["inside_mask_eps_fraction"][...]
    assert np.isfinite(eps_frac).all() and (eps_frac <= 1).all()
    assert (eps_frac[:, 0] > eps_frac[:, 1]).all()
    assert (eps_frac[:, 2] > eps_frac[:, 0]).all()
    # the stored localised share is the share measured on the edit's own direction
    np.testing.assert_allclose(b["localised_shares"][:, 0, 0], eps_frac[:, 2], rtol=1e-4)
    shares = b["localised_shares"][...]
    assert (shares[..., 0] >= shares[..., 1]).all() and (b["localised_responses"][...] > 0).all()
    norms = np.sqrt((b["localised_vectors"][...].reshape(2, 1, 2, -1) ** 2).sum(-1))
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)
    assert "localised_vectors" not in a  # no mask, nothing to localise to
    summary = jacobian_summary(masked.run_dir)  # the report's table
    np.testing.assert_allclose(summary["eps change inside, masked"], eps_frac[:, 0])
    np.testing.assert_allclose(summary["pixel change inside, localised"], frac[:, 2])
    assert "pixel change inside, unmasked" in summary and "mask area" not in jacobian_summary(plain.run_dir)
    assert len(list((masked.run_dir / "jacobian_strips").glob("*.png"))) == 2

    np.save(masks / "1.npy", np.ones((8, 8), dtype=np.float32))
    wrong = _config(tiny_pixel_model_dir, tmp_path / "c", "jacobian.mask=files", f"jacobian.mask_dir={masks}")
    run_sample_stage(wrong, show_progress=False)
    with pytest.raises(ValueError, match="mask for sample 1 has shape"):
        run_jacobian_stage(wrong, show_progress=False)
    assert not (wrong.run_dir / "jacobian.zarr").exists()


def test_a_partial_samples_store_or_too_few_samples_is_refused_before_anything_is_written(tiny_pixel_model_dir, tmp_path):
    config = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=shape")
    run_sample_stage(config, show_progress=False)
    too_many = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=shape", "jacobian.n_samples=7")
    with pytest.raises(ValueError, match="jacobian.n_samples is 7 but the run has 6 samples"):
        run_jacobian_stage(too_many, show_progress=False)
    # a sample stage killed part-way: unsampled images would read as empty masks
    del open_group(config.run_dir / "samples.zarr", mode="r+").attrs["hmine:complete"]
    with pytest.raises(FileNotFoundError, match="is not complete; run the sample stage first"):
        run_jacobian_stage(config, show_progress=False)
    assert not (config.run_dir / "jacobian.zarr").exists()


def test_the_flow_cache_key_follows_the_mask_files_and_the_samples_store(tiny_pixel_model_dir, tmp_path):
    from flows.caching import stage_key

    masks, left = _left_half_masks(tmp_path)
    config = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=files", f"jacobian.mask_dir={masks}")
    run_sample_stage(config, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    parameters = ("jacobian", config)
    key = stage_key(*parameters)
    assert stage_key(*parameters) == key  # nothing changed: a cache hit
    np.save(masks / "1.npy", 1 - left)  # same config, another mask: the stage would recompute
    assert stage_key(*parameters) != key
    assert run_jacobian_stage(config, show_progress=False).computed == 2
    key = stage_key(*parameters)
    # a samples store written again (a new uuid) is another input for every stage reading it
    from hmine.stages import input_identity

    label_identity = input_identity(config, "label")  # the label stage has not run: no key yet
    group = open_group(config.run_dir / "samples.zarr", mode="r+")
    group.attrs["hmine:store_uuid"] = "another-samples-store"
    assert stage_key(*parameters) != key and input_identity(config, "label") != label_identity


def test_jacobian_edits_use_the_scale_convention_of_every_direction(tiny_pixel_model_dir, tmp_path, monkeypatch):
    import hmine.directions

    seen = []
    original = hmine.directions.projection_std

    def recording(units, h):
        seen.append((units, original(units, h)))
        return seen[-1][1]

    monkeypatch.setattr(hmine.directions, "projection_std", recording)
    config = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=shape", "jacobian.edit_scales=[-1, 1]")
    run_sample_stage(config, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    (units, scale_units), = seen  # one pass over h for every edited direction
    stored = open_group(config.run_dir / "jacobian.zarr")["vectors"][0, 0, 0]
    np.testing.assert_array_equal(units[0, 0], stored)  # sample 0, masked, at the first step
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"].values.astype(np.float64)
    projections = h.reshape(*h.shape[:2], -1) @ stored.reshape(-1).astype(np.float64)  # (sample, step)
    np.testing.assert_allclose(scale_units[0], projections.std(axis=0, ddof=1), rtol=1e-6)  # all samples, ddof=1


def test_the_analysed_step_edit_window_edits_that_step_only(tiny_pixel_model_dir, tmp_path):
    """With jacobian.edit_window=analysed_step, the stored pixel share is that of an edit
    applied at the analysed step alone, recomputed here by hand with the sampler."""
    from hmine.directions import projection_std
    from hmine.editing import delta_for, regenerate_with_delta
    from hmine.stages.sample import make_sampler

    masks, left = _left_half_masks(tmp_path)
    config = _config(
        tiny_pixel_model_dir, tmp_path, "jacobian.mask=files", f"jacobian.mask_dir={masks}",
        "jacobian.edit_window=analysed_step", "jacobian.localised_rank=0",
    )
    run_sample_stage(config, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    group = open_group(config.run_dir / "jacobian.zarr")
    assert list(group["variant"][...]) == ["masked", "unmasked"] and "localised_vectors" not in group
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"]
    unit = np.broadcast_to(group["vectors"][0, 0, 0], (h.sizes["step"], *h.shape[2:])).astype(np.float32)
    scale_unit = projection_std(unit[None], h)[0]
    sampler = make_sampler(config)

    def image(scale, **window):
        return regenerate_with_delta(sampler, [0], delta_for(unit, scale_unit, scale), **window)[0]

    at_step = np.abs(image(1.0, t_edit=333, t_edit_max=333) - image(0.0)).sum(axis=0)
    everywhere = np.abs(image(1.0) - image(0.0)).sum(axis=0)
    expected = (at_step * left).sum() / at_step.sum()
    assert abs(group["inside_mask_fraction"][0, 0] - expected) < 1e-4
    assert abs((everywhere * left).sum() / everywhere.sum() - expected) > 1e-3  # the window matters


def test_strips_of_an_earlier_config_are_removed_and_never_reported(tiny_pixel_model_dir, tmp_path):
    from hmine.report import jacobian_strip_paths

    first = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=shape")
    run_sample_stage(first, show_progress=False)
    run_jacobian_stage(first, show_progress=False)
    strips = first.run_dir / "jacobian_strips"
    assert sorted(p.name for p in strips.glob("*.png")) == ["sample-0-t333.png", "sample-1-t333.png"]
    # another step and fewer samples: the old strips would show samples the store no longer holds
    second = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=shape", "jacobian.steps=[666]", "jacobian.n_samples=1")
    run_jacobian_stage(second, show_progress=False)
    assert sorted(p.name for p in strips.glob("*.png")) == ["sample-0-t666.png"]
    assert [p.name for p in jacobian_strip_paths(second.run_dir)] == ["sample-0-t666.png"]
    (strips / "sample-1-t333.png").write_bytes(b"a left-over")  # e.g. from an older hmine
    assert [p.name for p in jacobian_strip_paths(second.run_dir)] == ["sample-0-t666.png"]
    # no mask, no diagnostic edits: no strips, and none of the masked run's are reported
    third = _config(tiny_pixel_model_dir, tmp_path, "jacobian.steps=[666]", "jacobian.n_samples=1")
    run_jacobian_stage(third, show_progress=False)
    assert list(strips.glob("*.png")) == [] and jacobian_strip_paths(third.run_dir) == []


@pytest.mark.parametrize("loss", ["chunk", "folder"])
def test_lost_localised_vectors_are_detected_and_redone(tiny_pixel_model_dir, tmp_path, loss):
    """A lost chunk damages its (sample, step); a lost array folder every done one. Either
    way `hmine status` says damaged and the stage recreates what is missing."""
    import shutil

    from hmine.pipeline import stage_status
    from hmine.stages import damaged_count

    config = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=shape")
    run_sample_stage(config, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    path = config.run_dir / "jacobian.zarr"
    reference = open_group(path)["localised_vectors"][...]
    if loss == "chunk":
        (path / "localised_vectors" / "c" / "1" / "0" / "0" / "0" / "0" / "0").unlink()
    else:
        shutil.rmtree(path / "localised_vectors")
    assert not damaged_count(config, "jacobian") == 0
    assert {s.stage: s.state for s in stage_status(config.run_dir, config)}["jacobian"] == "damaged"
    again = run_jacobian_stage(config, show_progress=False)
    lost = 1 if loss == "chunk" else 2
    assert again.repaired == lost and again.computed == lost and damaged_count(config, "jacobian") == 0
    np.testing.assert_allclose(open_group(path)["localised_vectors"][...], reference, atol=1e-5)


def test_masks_outside_zero_one_are_refused(tiny_pixel_model_dir, tmp_path):
    masks, left = _left_half_masks(tmp_path)
    np.save(masks / "1.npy", left * 255)
    config = _config(tiny_pixel_model_dir, tmp_path, "jacobian.mask=files", f"jacobian.mask_dir={masks}")
    run_sample_stage(config, show_progress=False)
    with pytest.raises(ValueError, match=r"mask for sample 1 has values in \[0, 255\]"):
        run_jacobian_stage(config, show_progress=False)


def test_pairs_solved_together_equal_one_at_a_time(tiny_pixel_model_dir, tmp_path):
    """jacobian.batch_size only groups the (sample, step) pairs into shared U-Net calls: the
    stores agree within 0.01 degrees, and the setting is not in the stage hash."""
    masks, _ = _left_half_masks(tmp_path)
    stores = {}
    for batch_size in (1, 3):
        config = _config(
            tiny_pixel_model_dir, tmp_path / f"b{batch_size}", "jacobian.mask=files", f"jacobian.mask_dir={masks}",
            "jacobian.steps=[666, 333]", f"jacobian.batch_size={batch_size}",  # 4 pairs: batches of 3 and 1
        )
        run_sample_stage(config, show_progress=False)
        assert run_jacobian_stage(config, show_progress=False).computed == 4
        stores[batch_size] = open_group(config.run_dir / "jacobian.zarr")
        hashes = stores.setdefault("hash", set())
        hashes.add(config.stage_hash("jacobian"))
    assert len(stores["hash"]) == 1
    one, together = stores[1], stores[3]
    for name in ("vectors", "localised_vectors"):
        for i in range(2):
            for j in range(2):
                angles = principal_angles_degrees(one[name][i, j], together[name][i, j])
                assert angles.max() < 0.01, (name, i, j, angles)
    for name in ("singular_values", "localised_shares", "localised_responses"):
        np.testing.assert_allclose(together[name][...], one[name][...], rtol=1e-4)
    np.testing.assert_array_equal(together["iterations"][...], one["iterations"][...])
    np.testing.assert_allclose(together["inside_mask_eps_fraction"][...], one["inside_mask_eps_fraction"][...], rtol=1e-4)


def _one_seed_at_a_time(config, sampler, group, masks, variants):
    """The diagnostic edits as the stage did them up to 2026-12-02: per seed its own
    trajectory and unmasked top vector at batch 1, per (variant, scale) one regeneration."""
    import torch
    from torch.func import jvp

    from hmine.directions import projection_std
    from hmine.editing import delta_for, regenerate_with_delta
    from hmine.jacobian import eps_of_h, jacobian_subspace

    jac = config.jacobian
    h = xr.open_zarr(config.run_dir / "samples.zarr", consolidated=False)["h"]
    t_idx = [int(t) for t in sampler.timesteps].index(jac.steps[0])
    units, eps_fractions = [], []
    for i in range(jac.n_samples):
        out = sampler.sample([i], return_trajectory=True)
        f = eps_of_h(sampler.model.unet, out.trajectory[:, t_idx], sampler.timesteps[t_idx])
        h0 = out.h[0, t_idx].float()
        top = {"masked": group["vectors"][i, 0, 0], "localised": group["localised_vectors"][i, 0, 0]}
        top["unmasked"] = jacobian_subspace(f, h0, k=1, tol=jac.tol, max_iter=jac.max_iter, seed=i).vectors[0].numpy()
        units.append([np.broadcast_to(top[v], (h.sizes["step"], *h.shape[2:])) for v in variants])
        shares = []
        for v in variants:
            with torch.inference_mode(False), torch.no_grad():
                change = jvp(f, (h0,), (torch.from_numpy(np.asarray(top[v])).float(),))[1]
            shares.append(float((torch.from_numpy(masks[i]) * change).square().sum() / change.square().sum()))
        eps_fractions.append(shares)
    units = np.asarray(units, dtype=np.float32)
    scale_units = projection_std(units.reshape(-1, *units.shape[2:]), h).reshape(*units.shape[:2], -1)
    window = {"t_edit": jac.steps[0], "t_edit_max": jac.steps[0]} if jac.edit_window == "analysed_step" else {}
    images = np.stack([
        np.stack([
            np.stack([regenerate_with_delta(sampler, [i], delta_for(units[i, v], scale_units[i, v], s), **window)[0] for s in jac.edit_scales])
            for v in range(len(variants))
        ])
        for i in range(jac.n_samples)
    ])  # (sample, variant, scale, C, H, W)
    change = np.abs(images[:, :, -1] - images[:, :, jac.edit_scales.index(0.0)]).sum(axis=2)
    fractions = (change * masks[:, None]).sum(axis=(2, 3)) / change.sum(axis=(2, 3))
    return np.asarray(eps_fractions), fractions, images


@pytest.mark.parametrize("window", ["all_steps", "analysed_step"])
def test_diagnostic_edits_as_rows_equal_one_seed_at_a_time(tiny_pixel_model_dir, tmp_path, window):
    """The diagnostic edits go through hmine.regeneration (rows at a fixed U-Net batch) and the
    unmasked top vectors through jacobian_subspaces: the fractions and strips are those of
    the one-seed-at-a-time algorithm they replaced, to float tolerance. Three samples with
    their own masks at batch_size 2: a full batch and a short one."""
    from PIL import Image

    from hmine.editing import write_strip
    from hmine.stages.sample import make_sampler

    folder = tmp_path / "masks"
    folder.mkdir()
    masks = np.zeros((3, 16, 16), dtype=np.float32)
    masks[0, :, :8] = 1  # left half
    masks[1, :8] = 1  # top half
    masks[2, 8:, 8:] = 1  # bottom-right quarter
    for seed, mask in enumerate(masks):
        np.save(folder / f"{seed}.npy", mask)
    config = _config(
        tiny_pixel_model_dir,
        tmp_path,
        "jacobian.n_samples=3",
        "jacobian.mask=files",
        f"jacobian.mask_dir={folder}",
        f"jacobian.edit_window={window}",
        "jacobian.edit_scales=[-1, 1]",
        "jacobian.batch_size=2",
    )
    run_sample_stage(config, show_progress=False)
    run_jacobian_stage(config, show_progress=False)
    group = open_group(config.run_dir / "jacobian.zarr")
    variants = list(group["variant"][...])
    assert variants == ["masked", "unmasked", "localised"]
    eps_fractions, fractions, images = _one_seed_at_a_time(config, make_sampler(config), group, masks, variants)
    np.testing.assert_allclose(group["inside_mask_eps_fraction"][...], eps_fractions, atol=1e-4)
    np.testing.assert_allclose(group["inside_mask_fraction"][...], fractions, atol=1e-4)
    shown = [v for v, name in enumerate(variants) if name in ("masked", "localised")]
    for i in range(3):
        expected = tmp_path / f"expected-{i}.png"
        mask_tile = np.stack([masks[i]] * 3) * 2 - 1
        write_strip(np.stack([[mask_tile, *images[i, v]] for v in shown]), expected, upscale=3)
        got = np.asarray(Image.open(config.run_dir / "jacobian_strips" / f"sample-{i}-t333.png"), dtype=int)
        assert np.abs(got - np.asarray(Image.open(expected), dtype=int)).max() <= 1  # 8-bit rounding
