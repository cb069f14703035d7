"""Learned edits as results: ``learned.zarr`` (directions.zarr's schema) and the delta blocks' safetensors.

``learned.zarr`` is a direction store (:mod:`hmine.directions`, method ``learned``) that
:func:`hmine.directions.open_directions`, :func:`hmine.directions.direction_by_name` and
:func:`hmine.editing.delta_for` read like ``directions.zarr``:

* ``learned/<target>`` — the trained Δh_t;
* ``learned-block-mean/<target>`` — the delta block's mean edit over the training samples'
  stored h, mean_n f_t(h_{n,t}, t) (Asyrp's ``--num_mean_of_delta_hs``): a global direction
  made from the block.

Both in the scale convention (unit ``u_t`` per step, ``scale_unit_t`` the std of the
run's h along it). A learned Δh_t has its own length at every step, which a uniform scale
s (``s * scale_unit_t * u_t``) does not keep; the extra variable ``learned_scale``
(direction, step) = |Δh_t| / scale_unit_t is the scale that gives back the trained Δh_t at
step t, so coefficient c of the trained edit is :func:`learned_delta`:
``delta_for(u, learned_scale * scale_unit, c)`` = c Δh_t. Steps outside the trained
window have u_t = 0, scale_unit_t = 0 and learned_scale 0.

The delta block itself, which has no fixed direction, is ``learn/blocks/<target>.safetensors``
(weights, with its architecture, edit window and timesteps in the safetensors metadata);
:func:`load_block_editor` gives the editor that :func:`hmine.learning.apply.regenerate_learned`
applies at any coefficient.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import xarray as xr

from hmine.learning.delta_block import DeltaBlock
from hmine.learning.editors import BlockEditor

LEARNED_PREFIX = "learned/"
BLOCK_MEAN_PREFIX = "learned-block-mean/"
BLOCK_PREFIX = "learned-block/"  # the name the edit stage gives a delta block applied as a function of h


def learned_direction_dataset(raws: list[tuple[str, str, np.ndarray]], h: xr.DataArray) -> xr.Dataset:
    """The store's dataset from (name, attribute, Δh (step, channel, y, x)) triples and the run's h.

    ``h`` (sample, step, channel, y, x) defines the scale units (:func:`hmine.directions.normalise_directions`).
    """
    from hmine.directions import Direction, build_direction_dataset, normalise_directions

    arrays = [
        xr.DataArray(np.asarray(delta, dtype=np.float64), dims=("step", "channel", "y", "x"), coords={"step": h["step"].values},
                     name=name)  # fmt: skip
        for name, _, delta in raws
    ]
    normalised = normalise_directions(arrays, h)
    directions = [
        Direction(name=name, method="learned", unit=unit, scale_unit=scale, attribute=attribute)
        for (name, attribute, _), (unit, scale) in zip(raws, normalised)
    ]
    ds = build_direction_dataset(directions)
    norms = np.stack([np.sqrt((np.asarray(delta, dtype=np.float64) ** 2).reshape(len(delta), -1).sum(axis=1)) for _, _, delta in raws])
    scales = ds["scale_unit"].values
    ds["learned_scale"] = (
        ("direction", "step"),
        np.where(scales > 0, norms / np.where(scales > 0, scales, 1.0), 0.0),
        {"long_name": "the scale that gives back the trained delta at each step: |delta_t| / scale_unit_t"},
    )
    return ds


def learned_delta(ds: xr.Dataset, name: str, coefficient: float = 1.0) -> torch.Tensor:
    """``coefficient`` times the trained Δh_t of direction ``name`` (step, channel, y, x)."""
    from hmine.directions import direction_by_name
    from hmine.editing import delta_for

    selected = direction_by_name(ds, name)
    return delta_for(selected["direction"].values, selected["learned_scale"].values * selected["scale_unit"].values, coefficient)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_block(block: DeltaBlock, path: Path, edit_steps: list[bool], timesteps: list[int], target: str) -> str:
    """Write the block's weights and what applying it needs (metadata) as safetensors, atomically; return its sha256."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": "pt", "architecture": "hmine.learning.DeltaBlock", "config": json.dumps(block.config),
            "edit_steps": json.dumps([bool(e) for e in edit_steps]), "timesteps": json.dumps([int(t) for t in timesteps]),
            "target": target}  # fmt: skip
    save_file({k: v.detach().cpu().contiguous() for k, v in block.state_dict().items()}, str(tmp), metadata=meta)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    return file_sha256(path)


def load_block_editor(path: Path, timesteps: list[int] | None = None) -> BlockEditor:
    """The editor of a saved delta block (safetensors only), checked against the sampler's ``timesteps``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no delta block at {path}; run the learn stage (`hmine learn`) with learn.delta_block: true")
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
    if meta.get("architecture") != "hmine.learning.DeltaBlock":
        raise ValueError(f"{path} is not a delta block written by the learn stage (metadata {sorted(meta)})")
    stored_timesteps = json.loads(meta["timesteps"])
    if timesteps is not None and [int(t) for t in timesteps] != stored_timesteps:
        raise ValueError(f"{path} was trained for the timesteps {stored_timesteps}, the sampler has {list(timesteps)}; "
                         "use the run's sample.num_inference_steps")  # fmt: skip
    block = DeltaBlock(**json.loads(meta["config"]))
    block.load_state_dict(load_file(str(path)))
    return BlockEditor(block.eval().requires_grad_(False), json.loads(meta["edit_steps"])).eval()


@torch.no_grad()
def block_mean_delta(editor: BlockEditor, h, timesteps, batch_size: int = 256) -> np.ndarray:
    """mean_n f_t(h_{n,t}, t) per step over h (sample, step, channel, y, x): (step, channel, y, x), zero off the window.

    ``h`` may be lazy (the samples store's dask-backed ``h``): it is read one edited step and
    ``batch_size`` samples at a time, so memory holds ``batch_size`` x channel x y x x of it,
    however many samples and steps there are.
    """
    n, steps, device = h.shape[0], h.shape[1], next(editor.parameters()).device
    out = np.zeros(h.shape[1:], dtype=np.float64)
    for i in (i for i in range(steps) if editor.edit_steps[i]):
        for start in range(0, n, batch_size):
            h_i = torch.from_numpy(np.asarray(h[start : start + batch_size, i], dtype=np.float32)).to(device)
            out[i] += editor(h_i, i, timesteps[i]).double().sum(dim=0).cpu().numpy()
        out[i] /= n
    return out
