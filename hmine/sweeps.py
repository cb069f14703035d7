"""Per-sample sweep figures, Haas et al.'s direction plotter: one image, rows = directions, columns = scales.

The report draws one from the edit stage's store (every edited direction, the first sample
that all of them edit; scale 0 is the stored image) and one from the benchmark's edits
(every benchmarked direction, PCA components and the random one included), with
:func:`hmine.api.grid.image_grid`'s row and column labels.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from hmine.stores import open_group


def scale_label(scale: float) -> str:
    return "0" if scale == 0 else f"{scale:+g}"


def write_sweep(images: np.ndarray, directions, scales, path: Path, *, upscale: int = 3) -> Path:
    """Save ``images`` (direction, scale, 3, H, W) in [-1, 1] as one labelled PNG."""
    from hmine.api.grid import image_grid

    if images.shape[:2] != (len(directions), len(scales)):
        raise ValueError(f"images of shape {images.shape[:2]} for {len(directions)} directions x {len(scales)} scales")
    grid = image_grid(images, upscale=upscale, row_labels=[str(d) for d in directions],
                      column_labels=[scale_label(float(s)) for s in scales])  # fmt: skip
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return Path(path)


def edit_sweep(edits_path: Path) -> tuple[np.ndarray, list[str], list[float], object] | None:
    """From ``edits.zarr``: images (direction, scale, ...) of the first sample every direction edits
    (per-image Jacobian directions edit only their analysed samples; directions editing none of
    the chosen sample's are left out), the direction names, the scales and the sample's seed or id.
    None when no sample has any direction."""
    group = open_group(edits_path)
    names = [str(n) for n in group["direction"][...]]
    edited = np.asarray(group["edited"][...], dtype=bool) if "edited" in group else np.ones((len(names), 1), bool)
    counts = edited.sum(axis=0)
    if not len(counts) or counts.max() == 0:
        return None
    sample = int(np.argmax(counts))  # the first sample with the most directions
    rows = np.flatnonzero(edited[:, sample])
    images = np.stack([np.asarray(group["images"][d, :, sample]) for d in rows])
    return images, [names[d] for d in rows], [float(s) for s in group["scale"][...]], group["sample"][sample]


def edit_sweep_html(run_dir: Path, img: Path, item: str = "sample") -> str:
    """The edit section's sweep figure (an empty string without edits); ``item`` names what was
    edited: "sample", or "inverted image" with ``edit.source: inversions``."""
    from hmine.report import _img

    found = edit_sweep(Path(run_dir) / "edits.zarr")
    if found is None:
        return ""
    images, names, scales, sample = found
    write_sweep(images, names, scales, img / "edit_sweep.png")
    return (
        f"<h3>One {item} along every edited direction</h3><p>{item.capitalize()} <code>{html.escape(str(sample))}</code>; rows: "
        "directions, columns: scales (0 is the stored image), as Haas et al.'s direction plotter.</p>"
        + _img("img/edit_sweep.png", f"sweep of one {item} along every direction")
    )
