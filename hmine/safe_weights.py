"""Checking safetensors weight files before any loader opens them (never unpickling anything).

Used for every model part hmine loads: the U-Net and autoencoders (:mod:`hmine.models`),
text encoders (:mod:`hmine.text_models`) and CLIP (:mod:`hmine.clip.loading`).
"""

from __future__ import annotations

import json
from pathlib import Path

#: The weight file diffusers loads for every model part (``use_safetensors=True``, no variant),
#: and the index it prefers when the weights are sharded.
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
WEIGHTS_INDEX_NAME = WEIGHTS_NAME + ".index.json"
_SAFE_FIX = "hmine loads safetensors weights only - re-save the model with save_pretrained(safe_serialization=True)"


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())


def check_safetensors_weights(folder: Path, weights_name: str, what: str, fix: str) -> list[Path]:
    """The safetensors files ``from_pretrained(..., use_safetensors=True)`` reads from ``folder``, checked.

    Those are ``weights_name`` and the shards its index ``weights_name + ".index.json"``
    names (diffusers prefers the index, transformers the single file, so both are checked
    when both are there). Every shard must be a ``*.safetensors`` file in ``folder`` (a
    loader hands any other name to ``torch.load``), and every file's header must be readable
    by safetensors (which checks it against the file's length). Other weight files (a pickle
    ``.bin``, an unrelated ``*.safetensors``) are never opened and never count.

    Parameters
    ----------
    folder : Path
    weights_name : str
        ``diffusion_pytorch_model.safetensors`` (diffusers) or ``model.safetensors``
        (transformers); a name ending in ``.index.json`` is the index alone.
    what : str
        The config field and value the messages start with, e.g. ``model.id './m'``.
    fix : str
        What the user should do when the weights are missing.

    Returns
    -------
    list of Path

    Raises
    ------
    FileNotFoundError
        Neither the weights nor their index are there; one line naming the folder and ``fix``.
    ValueError
        An unreadable index, a shard that is not a safetensors file, or a corrupt file.
    """
    if weights_name.endswith(".index.json"):
        single, index = None, folder / weights_name
    else:
        single, index = folder / weights_name, folder / (weights_name + ".index.json")
    paths = []
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{what}: {index} is not a readable shard index ({_one_line(error)}); {fix}") from error
        unsafe = [
            shard for shard in shards
            if not (isinstance(shard, str) and shard.endswith(".safetensors") and Path(shard).name == shard)
        ]
        if unsafe or not shards:
            raise ValueError(f"{what}: {index} must name safetensors shards in {folder}, got {unsafe or 'none'}; {fix}")
        paths += [folder / shard for shard in shards]
    if single is not None and single.is_file():
        paths.append(single)
    if not paths:
        others = sorted(
            path.name for path in folder.iterdir()
            if path.is_file() and path.suffix in {".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl"}
        )
        held = f" (it holds {', '.join(others)}, which hmine does not load)" if others else ""
        wanted = f"{single.name} nor a sharded {index.name}" if single is not None else index.name
        raise FileNotFoundError(f"{what}: {folder} has no {wanted}{held}; {fix}")
    from safetensors import safe_open

    for path in paths:
        try:
            with safe_open(str(path), framework="pt") as handle:
                handle.keys()
        except Exception as error:  # safetensors raises its own error types
            raise ValueError(
                f"{what}: {path} is not a readable safetensors file ({_one_line(error)}); "
                "the download or copy is corrupt - fetch or save the model again"
            ) from error
    return paths
