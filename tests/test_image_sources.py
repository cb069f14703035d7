"""Image sources: folder listing, modes, resizing, labels, bad images, the rendered world."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from hmine.config import ConfigError, ImagesConfig, load_config
from hmine.image_sources import (
    BadImage,
    center_crop_box,
    list_image_files,
    open_image_source,
    read_image,
    source_fingerprint,
)

SIZE = (16, 16)


def _png(path, array, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


def _rgb(value, size=16):
    return np.full((size, size, 3), value, np.uint8)


def test_listing_is_recursive_sorted_and_ids_are_relative_paths(tmp_path):
    for name in ["b.png", "a/z.JPG", "a/c.jpeg", "notes.txt", "A.png"]:
        if name.endswith("txt"):
            (tmp_path / name).write_text("x")
        else:
            path = tmp_path / name
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_rgb(10)).save(path, format="PNG" if name.lower().endswith("png") else "JPEG")
    source = open_image_source(ImagesConfig(folder=tmp_path), SIZE)
    assert source.ids == ["A.png", "a/c.jpeg", "a/z.JPG", "b.png"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_image_files(tmp_path)] == source.ids
    images = source.load([0, 3])
    assert images.shape == (2, 3, 16, 16) and images.dtype == np.float32


def test_modes_greyscale_alpha_and_16_bit(tmp_path):
    grey = _png(tmp_path / "grey.png", np.full((16, 16), 255, np.uint8), "L")
    assert np.allclose(read_image(grey, SIZE), 1.0)
    # half-transparent black over white: mid grey
    rgba = np.zeros((16, 16, 4), np.uint8)
    rgba[..., 3] = 128
    alpha = _png(tmp_path / "alpha.png", rgba, "RGBA")
    assert np.allclose(read_image(alpha, SIZE), (1 - 128 / 255) * 2 - 1, atol=1e-6)
    # 16-bit greyscale keeps its precision: 32768 / 65535, not 128 / 255
    deep = np.full((16, 16), 32768, np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(deep).save(path)
    assert Image.open(path).mode.startswith("I")
    assert np.allclose(read_image(path, SIZE), 32768 / 65535 * 2 - 1, atol=1e-6)
    palette = Image.fromarray(_rgb(200)).convert("P", palette=Image.Palette.ADAPTIVE)
    palette.save(tmp_path / "palette.png")
    assert np.allclose(read_image(tmp_path / "palette.png", SIZE), 200 / 255 * 2 - 1, atol=1e-6)


def test_resize_centre_crops_and_resize_false_names_the_field(tmp_path):
    assert center_crop_box(100, 200, (32, 32)) == (0, 50, 100, 100)
    assert center_crop_box(200, 100, (16, 32)) == (75, 0, 50, 100)
    wide = np.zeros((32, 64, 3), np.uint8)
    wide[:, 16:48] = 255  # a white centre square between black side bands
    path = _png(tmp_path / "wide.png", wide)
    image = read_image(path, SIZE)
    assert image.shape == (3, 16, 16) and np.allclose(image, 1.0, atol=1e-5)  # the bands are cropped away
    with pytest.raises(ValueError, match="images.resize"):
        read_image(path, SIZE, resize=False)
    with pytest.raises(ValueError, match="images.resize"):
        open_image_source(ImagesConfig(folder=tmp_path, resize=False), SIZE)


def _bad_folder(tmp_path):
    _png(tmp_path / "good.png", _rgb(100))
    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(full)
    (tmp_path / "truncated.png").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    (tmp_path / "folder.png").mkdir()
    Image.fromarray(np.zeros((16, 16), np.float32), mode="F").save(tmp_path / "float.png", format="TIFF")
    (tmp_path / "text.jpg").write_text("not an image")
    return tmp_path


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("truncated.png", "truncated.png is not a readable image"),
        ("folder.png", "folder.png is a directory named like an image"),
        ("float.png", "float.png: image mode F is not supported"),
        ("text.jpg", "text.jpg is not a readable image"),
    ],
)
def test_each_bad_image_is_one_line_naming_the_file(tmp_path, name, message):
    folder = _bad_folder(tmp_path)
    with pytest.raises(BadImage, match=message) as caught:
        read_image(folder / name, SIZE)
    assert "\n" not in str(caught.value)


def test_bad_images_fail_the_source_or_are_skipped_and_recorded(tmp_path):
    folder = _bad_folder(tmp_path)
    (folder / "full.png").unlink()
    with pytest.raises(BadImage, match=r"float.png.*on_bad_image: skip"):
        open_image_source(ImagesConfig(folder=folder), SIZE)
    source = open_image_source(ImagesConfig(folder=folder, on_bad_image="skip"), SIZE)
    assert source.ids == ["good.png"]
    assert sorted(s["id"] for s in source.skipped) == ["float.png", "folder.png", "text.jpg", "truncated.png"]
    assert all(s["reason"] for s in source.skipped)


def test_labels_by_relative_path_or_unique_name_and_a_missing_row(tmp_path):
    folder = tmp_path / "images"
    for name in ["x/one.png", "two.png", "three.png"]:
        _png(folder / name, _rgb(50))
    table = pd.DataFrame({"file": ["one.png", "two.png", "three.png"], "smiling": [1, 0, 1], "age": [0.2, 0.5, 0.9]})
    table.to_csv(tmp_path / "labels.csv", index=False)
    source = open_image_source(ImagesConfig(folder=folder, labels=tmp_path / "labels.csv"), SIZE)
    assert source.ids == ["three.png", "two.png", "x/one.png"]
    assert source.labels.loc["x/one.png", "age"] == pytest.approx(0.2)
    assert list(source.labels["smiling"]) == [1.0, 0.0, 1.0]
    table.iloc[:2].to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(BadImage, match=r"labels.parquet has no row for image 'three.png'.*add its row"):
        open_image_source(ImagesConfig(folder=folder, labels=tmp_path / "labels.parquet"), SIZE)
    skipped = open_image_source(ImagesConfig(folder=folder, labels=tmp_path / "labels.parquet", on_bad_image="skip"), SIZE)
    assert skipped.ids == ["two.png", "x/one.png"] and skipped.skipped[0]["id"] == "three.png"
    pd.DataFrame({"name": ["two.png"], "a": [1]}).to_csv(tmp_path / "nokey.csv", index=False)
    with pytest.raises(ValueError, match="no 'file' column"):
        open_image_source(ImagesConfig(folder=folder, labels=tmp_path / "nokey.csv"), SIZE)
    pd.DataFrame({"file": ["two.png"], "a": ["yes"]}).to_csv(tmp_path / "text.csv", index=False)
    with pytest.raises(ValueError, match="not numeric"):
        open_image_source(ImagesConfig(folder=folder, labels=tmp_path / "text.csv"), SIZE)


def test_world_source_renders_with_true_labels():
    from hmine import world

    source = open_image_source(ImagesConfig(world={"n": 5, "seed": 3}), (32, 32))
    batch = world.generate(5, 3)
    assert source.ids[0] == "world-s3-000000" and len(source) == 5
    assert np.array_equal(source.load([1, 4]), batch.images[[1, 4]])
    truth = world.binary_attributes(batch.factors)
    assert list(source.labels.columns) == list(truth)
    assert np.array_equal(source.labels["is_red"].to_numpy() > 0.5, truth["is_red"])
    with pytest.raises(ValueError, match="shapes-world"):
        open_image_source(ImagesConfig(world={"n": 2}), (16, 16))


def test_config_section_is_checked_and_fingerprinted(tmp_path):
    for bad in ("images: {}", "images: {folder: x, world: {n: 2}}", "images: {world: {n: 2}, labels: l.csv}"):
        path = tmp_path / "c.yaml"
        path.write_text(bad)
        with pytest.raises(ConfigError, match="images"):
            load_config(path)
    _png(tmp_path / "im" / "a.png", _rgb(1))
    config = ImagesConfig(folder=tmp_path / "im")
    before = source_fingerprint(config)
    _png(tmp_path / "im" / "b.png", _rgb(1))
    assert source_fingerprint(config) != before
