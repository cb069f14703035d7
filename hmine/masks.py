"""Masks of image regions for the Jacobian stage: the shape, the background, or user files.

A mask is a float32 (height, width) array in [0, 1] at the image resolution. User masks
are ``<seed>.npy`` (never unpickled) or grey-scale ``<seed>.png`` files in
``jacobian.mask_dir``; their content hash is part of the Jacobian stage's input identity,
since the files can change under the same config.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from hmine.config import RunConfig


def load_masks(config: RunConfig, seeds: np.ndarray, images: np.ndarray) -> np.ndarray | None:
    """Masks (sample, height, width) in [0, 1] for the analysed samples, or None for no mask."""
    from hmine import world

    kind = config.jacobian.mask
    height, width = images.shape[-2:]
    if kind == "none":
        return None
    if kind in ("shape", "background"):
        foreground = world.foreground_mask(images)
        return (foreground if kind == "shape" else ~foreground).astype(np.float32)
    return np.stack([read_mask_file(config.jacobian.mask_dir, seed, (height, width)) for seed in seeds])


def read_mask_file(mask_dir: Path, seed: int, image_size: tuple[int, int] | None) -> np.ndarray:
    """The user mask ``<mask_dir>/<seed>.npy`` (or ``.png``) as float32, checked against the image size."""
    stem = Path(mask_dir) / str(int(seed))
    npy, png = stem.with_suffix(".npy"), stem.with_suffix(".png")
    if npy.exists():
        try:
            mask = np.load(npy, allow_pickle=False)  # never unpickle a user's file
        except (ValueError, OSError, EOFError) as error:
            raise ValueError(
                f"jacobian.mask_dir: {npy} is not a plain numeric .npy array ({error}); save it with "
                "np.save(path, mask.astype(np.float32)), or as a grey-scale PNG"
            ) from None
    elif png.exists():
        from PIL import Image, UnidentifiedImageError

        try:
            mask = np.asarray(Image.open(png).convert("L"), dtype=np.float32) / 255.0
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"jacobian.mask_dir: {png} is not a readable PNG ({error}); save it again") from None
    else:
        raise FileNotFoundError(
            f"no mask for sample {int(seed)}: expected {stem}.npy or {stem}.png in jacobian.mask_dir"
        )
    mask = np.asarray(mask, dtype=np.float32)
    if mask.size and (mask.min() < 0 or mask.max() > 1):
        raise ValueError(
            f"mask for sample {int(seed)} has values in [{mask.min():g}, {mask.max():g}]; save weights in "
            "[0, 1] (.npy), or a grey-scale PNG, which is read as 0..255 / 255"
        )
    if image_size is not None and mask.shape != tuple(image_size):
        raise ValueError(
            f"mask for sample {int(seed)} has shape {mask.shape}, but the images are "
            f"{image_size[0]}x{image_size[1]}; save masks at the image size"
        )
    return mask


def content_hash(masks: np.ndarray | None) -> str:
    return hashlib.sha256(masks.tobytes()).hexdigest()[:16] if masks is not None else "none"


def mask_hash(config: RunConfig) -> str:
    """Content hash of the masks the stage would use now ("none" without masks).

    Part of the stage's key beside its config hash: mask files can change under the same
    config. Reads the first ``jacobian.n_samples`` images of a complete samples store
    (a shape mask is computed from them); "unknown" when the store is not complete or
    its images do not read back (damaged chunks, which the sample stage redoes first).
    """
    from hmine.stages.sample import samples_path
    from hmine.stores import open_group, store_state

    if store_state(samples_path(config)) != "complete":
        return "unknown"
    samples = open_group(samples_path(config))
    seeds = samples["sample"][...][: config.jacobian.n_samples]
    if config.jacobian.mask == "none":
        return "none"
    try:
        images = np.asarray(samples["x0"][: len(seeds)], dtype=np.float32)
    except ValueError:  # a chunk failing its checksum: no identity until it is redone
        return "unknown"
    return content_hash(load_masks(config, seeds, images))


def mask_for_eps(mask: np.ndarray, sample_shape) -> torch.Tensor:
    """A (1, 1, H, W) mask at the resolution of eps (downsampled for a latent model)."""
    tensor = torch.from_numpy(mask)[None, None]
    if tuple(tensor.shape[-2:]) != tuple(sample_shape[-2:]):
        tensor = torch.nn.functional.interpolate(tensor, size=tuple(sample_shape[-2:]), mode="area")
    return tensor


def check_mask_files(config: RunConfig) -> None:
    """Preflight: every mask file the Jacobian stage will read exists, is a plain array or
    PNG in [0, 1] and, for a pixel model of known size, has the image size. Loads no weights."""
    jacobian = config.jacobian
    if jacobian.mask != "files" or not jacobian.n_samples:
        return
    from hmine.models import image_size_of

    image_size = image_size_of(config.model.id)  # None when unknown before loading (hub, latent)
    for seed in config.sample.seeds[: jacobian.n_samples]:
        read_mask_file(jacobian.mask_dir, seed, image_size)
