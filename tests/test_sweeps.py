"""Per-sample sweep figures (rows directions, columns scales) from an edit store."""

from __future__ import annotations

import numpy as np
import pytest
import zarr
from PIL import Image

from hmine.sweeps import edit_sweep, edit_sweep_html, write_sweep


@pytest.fixture
def edits(tmp_path):
    """An edits.zarr of 3 directions x 3 scales x 2 samples; the Jacobian one edits sample 1 only."""
    rng = np.random.default_rng(0)
    group = zarr.open_group(str(tmp_path / "edits.zarr"), mode="w")
    images = rng.uniform(-1, 1, size=(3, 3, 2, 3, 8, 8)).astype(np.float32)
    group.create_array("images", data=images)
    group.create_array("edited", data=np.array([[True, True], [True, True], [False, True]]))
    group.create_array("direction", data=np.array(["probe/a", "pca/0", "jacobian/0"]))
    group.create_array("scale", data=np.array([-5.0, 0.0, 5.0]))
    group.create_array("sample", data=np.array([11, 12]))
    return tmp_path, images


def test_the_sweep_is_the_sample_with_the_most_directions(edits):
    run_dir, images = edits
    found, names, scales, sample = edit_sweep(run_dir / "edits.zarr")
    assert names == ["probe/a", "pca/0", "jacobian/0"] and scales == [-5.0, 0.0, 5.0] and int(sample) == 12
    np.testing.assert_array_equal(found, images[:, :, 1])


def test_the_sweep_figure_is_a_labelled_grid(edits, tmp_path):
    run_dir, images = edits
    html = edit_sweep_html(run_dir, tmp_path)
    assert "edit_sweep.png" in html and "<code>12</code>" in html
    figure = Image.open(tmp_path / "edit_sweep.png")
    # 3 x 3 cells of 8 px, upscaled 3x, plus labels left of the rows and above the columns
    assert figure.width > 3 * 3 * 8 and figure.height > 3 * 3 * 8
    with pytest.raises(ValueError, match="2 directions x 3 scales"):
        write_sweep(images[:, :, 0], ["a", "b"], [-5, 0, 5], tmp_path / "bad.png")
