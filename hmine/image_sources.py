"""Real images for inversion: a folder of PNG/JPEG files with optional labels, or rendered world images.

The config section ``images:`` (:class:`hmine.config.ImagesConfig`) names one source:

``folder``
    Every ``*.png``, ``*.jpg`` and ``*.jpeg`` file under the folder (any case, recursively),
    sorted by its path relative to the folder; that relative path (with ``/``) is the
    image's id, the ``sample`` coordinate of ``inversions.zarr``.
``world: {n, seed}``
    ``world.generate(n, seed)``: the embedded shapes world *rendered* (not sampled), with
    its true factors; the binary attributes are the labels. Ids are ``world-s<seed>-<index>``.

Reading a file (:func:`read_image`):

* modes: 1-bit, greyscale (``L``, 16-bit ``I;16``/``I``), palette, ``RGB``, ``CMYK`` and
  ``YCbCr`` become RGB; greyscale is repeated over the three channels; 16-bit values are
  divided by 65535 (8-bit ones by 255), so no precision is lost before resizing;
* alpha (``LA``, ``RGBA``, ``PA``, transparent palettes) is composited over white;
* any other mode (float ``F``, ``HSV``, ``LAB``, ...) is a bad image;
* size: with ``resize: true`` the largest centred region of the model's aspect ratio is
  cut out (offsets rounded down) and resized to the model's size with antialiased bicubic
  interpolation (``torch.nn.functional.interpolate(..., antialias=True)``), then clamped
  to [0, 1]; with ``resize: false`` an image of another size is refused, naming
  ``images.resize``;
* pixels are returned in [-1, 1] (x / 0.5 - 1), as the models make them.

Bad images — unreadable or truncated files, unsupported modes, a directory named like an
image, an image the label file has no row for — raise :class:`BadImage` (one line: the
file, what is wrong, the fix) with ``on_bad_image: fail`` (the default), and are left out
with ``on_bad_image: skip``: the skipped ids and their reasons are listed in
:attr:`ImageSource.skipped` and recorded in the store (``hmine:skipped_images``).

Label files (``labels:``): CSV or parquet (by suffix), one row per image, a column ``file``
holding the image's id (its relative path; a bare file name matches when it is unique in
the folder), every other column a numeric or boolean label. Parquet is read with pyarrow,
CSV with pandas' C parser: nothing in them is ever unpickled.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
LABEL_KEY = "file"
_RGB_MODES = {"1", "L", "P", "RGB", "CMYK", "YCbCr", "I;16", "I;16B", "I;16L", "I;16N", "I"}
_ALPHA_MODES = {"LA", "La", "RGBA", "RGBa", "PA"}


class BadImage(ValueError):
    """An image file that cannot be used; the message names the file, the problem and the fix."""


@dataclass
class ImageSource:
    """The images of a run's ``images:`` section, listed and checked, loaded batch by batch.

    Attributes
    ----------
    ids : list of str
        Image ids in order (relative paths, or world ids).
    labels : pandas.DataFrame or None
        Index: the ids; one float column per label (the world's binary attributes).
    skipped : list of dict
        ``{"id": ..., "reason": ...}`` of every image left out (``on_bad_image: skip``).
    size : tuple of int
        (height, width) the images are loaded at.
    """

    ids: list[str]
    labels: object | None
    skipped: list[dict]
    size: tuple[int, int]
    _paths: list[Path] = field(default_factory=list, repr=False)
    _world: np.ndarray | None = field(default=None, repr=False)
    _resize: bool = True

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, indices) -> np.ndarray:
        """Images ``indices`` as float32 (n, 3, height, width) in [-1, 1]."""
        indices = list(indices)
        if self._world is not None:
            return self._world[indices]
        return np.stack([read_image(self._paths[i], self.size, resize=self._resize) for i in indices])


def list_image_files(folder: Path) -> list[Path]:
    """Every path under ``folder`` whose name ends in .png/.jpg/.jpeg (any case), sorted by
    relative path; directories named like images are listed too (they are bad images)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"images.folder {folder} is not a folder; point images.folder at the folder of images")
    found = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in [*files, *dirs]:
            if name.lower().endswith(IMAGE_SUFFIXES):
                found.append(Path(root) / name)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


def image_id(folder: Path, path: Path) -> str:
    return Path(path).relative_to(folder).as_posix()


def _as_rgb_array(image, path: Path) -> np.ndarray:
    """(H, W, 3) float32 in [0, 1] from a PIL image of any supported mode (module doc)."""
    mode = image.mode
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
        alpha = rgba[..., 3:4]
        return rgba[..., :3] * alpha + (1.0 - alpha)  # over white
    if mode not in _RGB_MODES:
        raise BadImage(
            f"{path}: image mode {mode} is not supported; save it as an 8- or 16-bit RGB or greyscale PNG or JPEG"
        )
    if mode.startswith("I"):  # 16-bit greyscale (I;16*) or 32-bit integer holding 16-bit values
        grey = np.asarray(image, dtype=np.float64)
        if grey.max() > 65535 or grey.min() < 0:
            raise BadImage(f"{path}: integer image with values outside 0..65535; save it as 8- or 16-bit PNG")
        grey = (grey / 65535.0).astype(np.float32)
        return np.repeat(grey[..., None], 3, axis=2)
    if mode in ("1", "L"):
        grey = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        return np.repeat(grey[..., None], 3, axis=2)
    return np.asarray(image.convert("RGB") if mode != "RGB" else image, dtype=np.float32) / 255.0


def center_crop_box(height: int, width: int, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(top, left, crop height, crop width): the largest centred region of ``size``'s aspect ratio.

    >>> center_crop_box(100, 200, (32, 32))
    (0, 50, 100, 100)
    """
    target_h, target_w = size
    if width * target_h > height * target_w:  # too wide: keep the full height
        crop_h, crop_w = height, (height * target_w) // target_h
    else:
        crop_h, crop_w = (width * target_h) // target_w, width
    return (height - crop_h) // 2, (width - crop_w) // 2, crop_h, crop_w


def read_image(path: Path, size: tuple[int, int], *, resize: bool = True) -> np.ndarray:
    """One image file as float32 (3, height, width) in [-1, 1] (module doc for the rules).

    Raises
    ------
    BadImage
        Unreadable, truncated or a directory, or of an unsupported mode.
    ValueError
        ``resize=False`` and the image is not ``size``: names ``images.resize``.
    """
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.is_dir():
        raise BadImage(f"{path} is a directory named like an image; rename it or move it out of images.folder")
    try:
        with Image.open(path) as image:
            image.load()
            array = _as_rgb_array(image, path)
    except BadImage:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:
        reason = " ".join(str(error).split()) or type(error).__name__
        raise BadImage(f"{path} is not a readable image ({reason}); replace the file or remove it") from None
    height, width = array.shape[:2]
    if (height, width) != tuple(size):
        if not resize:
            raise ValueError(
                f"{path} is {width}x{height} but the model makes {size[1]}x{size[0]} images and images.resize "
                "is false; set images.resize: true (centre crop + resize) or resize the images"
            )
        array = _crop_and_resize(array, size)
    return (array.transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)


def _crop_and_resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    import torch

    top, left, crop_h, crop_w = center_crop_box(array.shape[0], array.shape[1], size)
    crop = np.ascontiguousarray(array[top : top + crop_h, left : left + crop_w])
    tensor = torch.from_numpy(crop).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(tensor, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return resized[0].permute(1, 2, 0).clamp(0, 1).numpy()


def read_labels(path: Path):
    """A label table (CSV or parquet) with its ``file`` column as index; one-line errors naming it."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"images.labels {path} does not exist; fix the path or remove images.labels")
    try:
        if path.suffix.lower() == ".parquet":
            frame = pd.read_parquet(path, engine="pyarrow")
        elif path.suffix.lower() == ".csv":
            frame = pd.read_csv(path)
        else:
            raise ValueError(f"images.labels {path}: expected a .csv or .parquet file")
    except (OSError, ValueError, pd.errors.ParserError) as error:
        raise ValueError(f"images.labels {path} cannot be read ({' '.join(str(error).split())}); fix or rewrite it") from None
    if LABEL_KEY not in frame.columns:
        raise ValueError(
            f"images.labels {path} has no '{LABEL_KEY}' column; add one holding each image's path "
            f"relative to images.folder (columns found: {list(frame.columns)})"
        )
    frame[LABEL_KEY] = frame[LABEL_KEY].astype(str)
    duplicated = frame[LABEL_KEY][frame[LABEL_KEY].duplicated()].tolist()
    if duplicated:
        raise ValueError(f"images.labels {path} has more than one row for {duplicated[:3]}; keep one row per image")
    frame = frame.set_index(LABEL_KEY)
    bad = [c for c in frame.columns if not (pd.api.types.is_numeric_dtype(frame[c]) or pd.api.types.is_bool_dtype(frame[c]))]
    if bad:
        raise ValueError(f"images.labels {path}: columns {bad} are not numeric or boolean; labels must be numbers")
    return frame.astype(np.float32)


def _match_labels(frame, ids: list[str], path: Path):
    """Rows of ``frame`` for ``ids`` (exact id, else a unique bare file name); missing ids listed."""
    names = [i.rsplit("/", 1)[-1] for i in ids]
    unique_names = {n for n in names if names.count(n) == 1}
    rows, missing = {}, []
    for i, name in zip(ids, names):
        if i in frame.index:
            rows[i] = frame.loc[i]
        elif name in unique_names and name in frame.index:
            rows[i] = frame.loc[name]
        else:
            missing.append(i)
    return rows, missing


def open_image_source(images, size: tuple[int, int]) -> ImageSource:
    """List and check the images of an ``images:`` config section at ``size`` (height, width).

    Every file is decoded once here, so a bad image is found before any inversion, and the
    ids are final (``on_bad_image: skip`` leaves bad ones out, recorded in ``skipped``).

    Raises
    ------
    BadImage
        The first bad image, with ``on_bad_image: fail``.
    ValueError, FileNotFoundError
        A label file that cannot be used, or an image of another size with ``resize: false``.
    """
    import pandas as pd

    size = (int(size[0]), int(size[1]))
    if images.world is not None:
        from hmine import world

        batch = world.generate(images.world.n, images.world.seed)
        ids = [f"world-s{images.world.seed}-{i:06d}" for i in range(images.world.n)]
        if tuple(batch.images.shape[2:]) != size:
            raise ValueError(
                f"images.world renders {batch.images.shape[3]}x{batch.images.shape[2]} images, the model makes "
                f"{size[1]}x{size[0]}; use images.world with the embedded shapes-world model"
            )
        attrs = world.binary_attributes(batch.factors)
        labels = pd.DataFrame({k: v.astype(np.float32) for k, v in attrs.items()}, index=pd.Index(ids, name="id"))
        return ImageSource(ids, labels, [], size, _world=batch.images.astype(np.float32))
    folder = Path(images.folder)
    paths = list_image_files(folder)
    if not paths:
        raise FileNotFoundError(f"images.folder {folder} holds no .png/.jpg/.jpeg files; point it at a folder of images")
    skipped: list[dict] = []
    good: list[Path] = []
    for path in paths:
        try:
            read_image(path, size, resize=images.resize)
        except BadImage as error:
            if images.on_bad_image == "fail":
                raise BadImage(f"{error} (or set images.on_bad_image: skip)") from None
            skipped.append({"id": image_id(folder, path), "reason": str(error)})
            continue
        good.append(path)
    ids = [image_id(folder, p) for p in good]
    labels = None
    if images.labels is not None:
        frame = read_labels(images.labels)
        rows, missing = _match_labels(frame, ids, Path(images.labels))
        if missing and images.on_bad_image == "fail":
            raise BadImage(
                f"images.labels {images.labels} has no row for image {missing[0]!r}"
                f"{f' (and {len(missing) - 1} more)' if len(missing) > 1 else ''}; add its row or remove the image "
                "(or set images.on_bad_image: skip)"
            )
        for i in missing:
            skipped.append({"id": i, "reason": f"images.labels {images.labels} has no row for it"})
        keep = [k for k, i in enumerate(ids) if i in rows]
        good, ids = [good[k] for k in keep], [ids[k] for k in keep]
        labels = pd.DataFrame([rows[i].to_numpy() for i in ids], columns=frame.columns, index=pd.Index(ids, name="id"))
        labels = labels.astype(np.float32)
    if not ids:
        raise BadImage(f"images.folder {folder}: every image was skipped ({skipped[0]['reason']}); fix the images")
    return ImageSource(ids, labels, skipped, size, _paths=good, _resize=images.resize)


def source_fingerprint(images) -> str:
    """A hash of what an ``images:`` section reads: the world's (n, seed), or every file's
    relative path, size and modification time and the label file's (for the stage's identity)."""
    digest = hashlib.sha256()
    if images.world is not None:
        digest.update(f"world:{images.world.n}:{images.world.seed}".encode())
        return digest.hexdigest()[:16]
    folder = Path(images.folder)
    files = list_image_files(folder) if folder.is_dir() else []
    if images.labels is not None and Path(images.labels).is_file():
        files.append(Path(images.labels))
    for path in files:
        stat = path.stat()
        digest.update(f"{path.as_posix()}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
