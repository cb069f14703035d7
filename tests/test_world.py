import numpy as np

from hmine import world


def test_generation_is_deterministic_and_seed_dependent():
    a, b, c = world.generate(16, seed=3), world.generate(16, seed=3), world.generate(16, seed=4)
    np.testing.assert_array_equal(a.images, b.images)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (16, 3, 32, 32) and a.images.dtype == np.float32
    assert a.images.min() >= -1 and a.images.max() <= 1


def test_pixel_centroid_and_area_match_the_factors():
    batch = world.generate(200, seed=0)
    f = batch.factors
    ys, xs = np.mgrid[0:32, 0:32] + 0.5
    mass = batch.masks.sum(axis=(1, 2))
    cx = (batch.masks * xs).sum(axis=(1, 2)) / mass
    cy = (batch.masks * ys).sum(axis=(1, 2)) / mass
    np.testing.assert_allclose(cx, f["x"], atol=0.2)  # 4x supersampling quantises to 1/4 px
    # the triangle's centroid sits below its bounding-box centre (at y + r/3)
    expected_cy = np.where(f["shape"] == 2, f["y"] + f["size"] / 3, f["y"])
    np.testing.assert_allclose(cy, expected_cy, atol=0.25)
    # area: circle pi r^2, square 4 r^2, triangle 2 r^2
    area = np.select([f["shape"] == 0, f["shape"] == 1], [np.pi * f["size"] ** 2, 4 * f["size"] ** 2], 2 * f["size"] ** 2)
    np.testing.assert_allclose(mass, area, rtol=0.05)


def test_colours_and_background_are_rendered():
    batch = world.generate(100, seed=1)
    inside = batch.masks > 0.99
    for i in range(100):
        pixel = batch.images[i][:, inside[i]].mean(axis=1)
        np.testing.assert_allclose((pixel + 1) / 2, world.PALETTE[batch.factors["color"][i]], atol=1e-5)
        corner = (batch.images[i][:, 0, 0] + 1) / 2
        if batch.masks[i][0, 0] == 0:
            np.testing.assert_allclose(corner, batch.factors["background"][i], atol=1e-5)


def test_shapes_stay_inside_the_canvas():
    f = world.generate(500, seed=2).factors
    assert (f["x"] - f["size"] >= 1).all() and (f["x"] + f["size"] <= 31).all()
    assert (f["y"] - f["size"] >= 1).all() and (f["y"] + f["size"] <= 31).all()


def test_the_correlated_pair_is_present_and_others_are_not():
    f = world.sample_factors(20000, seed=5)
    attrs = world.binary_attributes(f)
    red_given_circle = attrs["is_red"][attrs["is_circle"]].mean()
    red_given_other = attrs["is_red"][~attrs["is_circle"]].mean()
    assert abs(red_given_circle - world.P_RED_GIVEN_CIRCLE) < 0.02
    assert abs(red_given_other - 1 / 3) < 0.02
    assert abs(np.corrcoef(attrs["is_large"], attrs["is_left"])[0, 1]) < 0.03


def test_foreground_mask_recovers_the_shape():
    batch = world.generate(50, seed=6)
    mask = world.foreground_mask(batch.images)
    truth = batch.masks > 0.5
    agreement = (mask == truth).mean(axis=(1, 2))
    assert agreement.min() > 0.97


def test_coverage_in_chunks_is_the_same_as_at_once():
    factors = world.sample_factors(50, seed=7)
    np.testing.assert_array_equal(world.shape_coverage(factors, chunk=16), world.shape_coverage(factors, chunk=64))
