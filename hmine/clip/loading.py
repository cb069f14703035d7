"""Loading a CLIP checkpoint: the model (safetensors only), its tokenizer and its image processor settings.

The model loads with ``CLIPModel.from_pretrained(..., use_safetensors=True)`` from a hub id
or a local folder alike; every loader failure becomes an error that says what to do. A
checkpoint without a processor config gets CLIP's defaults sized to its vision tower, and
a log line says so.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hmine.clip.preprocessing import PROCESSOR_CONFIG, ImagePreprocessing

logger = logging.getLogger(__name__)


def _looks_like_local_path(model_id: str) -> bool:
    """True when ``model_id`` can only be a folder (hub ids are ``name`` or ``owner/name``)."""
    return (
        Path(model_id).expanduser().exists()
        or model_id.startswith(("/", ".", "~"))
        or model_id.count("/") > 1
        or "\\" in model_id
    )


def load_clip(model_id: str, revision: str | None):
    """Load ``CLIPModel`` (safetensors only) and its tokenizer from a hub id or a local folder.

    Returns
    -------
    (CLIPModel, tokenizer)

    Raises
    ------
    OSError
        A hub id that cannot be loaded (offline and not cached, or no safetensors).
    FileNotFoundError, ValueError
        A local folder that is missing, or whose config, weights or tokenizer are unusable;
        the message says what to do.
    """
    what = f"label.clip_model_id {model_id!r}"
    if not _looks_like_local_path(model_id):
        return _load_from_hub(model_id, revision, what)
    return _load_from_folder(Path(model_id).expanduser(), what)


def _load_from_hub(model_id: str, revision: str | None, what: str):
    from transformers import AutoTokenizer, CLIPModel

    try:
        return (
            CLIPModel.from_pretrained(model_id, revision=revision, use_safetensors=True),
            AutoTokenizer.from_pretrained(model_id, revision=revision),
        )
    except OSError as error:
        raise OSError(
            f"{what}: could not load the CLIP model (revision {revision or 'main'}) from the hub or the "
            "local cache; download it once with network access (hmine loads model.safetensors only, "
            "so pick a revision that has it), or set label.clip_model_id to a local folder saved with "
            f"CLIPModel.save_pretrained and tokenizer.save_pretrained ({' '.join(str(error).split())})"
        ) from error


def _load_from_folder(folder: Path, what: str):
    from transformers import AutoTokenizer, CLIPModel

    from hmine.models import check_safetensors_weights

    if not folder.is_dir():
        raise FileNotFoundError(
            f"{what}: CLIP model folder {folder} does not exist; set label.clip_model_id to a folder saved with "
            "CLIPModel.save_pretrained (plus its tokenizer) or to a hub id such as 'openai/clip-vit-base-patch32'"
        )
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(
            f"{what}: CLIP model folder {folder} has no config.json; save the model there with "
            "CLIPModel.save_pretrained, or set label.clip_model_id to a hub id"
        )
    safe_fix = "hmine loads safetensors weights only - re-save the model with CLIPModel.save_pretrained(safe_serialization=True)"
    try:
        # transformers loads the file config.json names in transformers_weights first
        weights_name = json.loads((folder / "config.json").read_text()).get("transformers_weights")
    except (OSError, ValueError, AttributeError):
        weights_name = None  # from_pretrained reports the unreadable config below
    if weights_name is not None and not str(weights_name).endswith((".safetensors", ".safetensors.index.json")):
        raise ValueError(f"{what}: config.json names transformers_weights={weights_name!r}, not a safetensors file; {safe_fix}")
    # Before transformers opens anything: only model.safetensors (or its safetensors shards) count.
    check_safetensors_weights(folder, weights_name or "model.safetensors", what, safe_fix)
    try:
        model = CLIPModel.from_pretrained(folder, use_safetensors=True)
    except Exception as error:  # corrupt weights or config raise many types (OSError, SafetensorError, ...)
        raise ValueError(
            f"{what}: CLIP model folder {folder} could not be loaded as a CLIPModel "
            f"({type(error).__name__}: {' '.join(str(error).split())}); re-save it with CLIPModel.save_pretrained"
        ) from error
    tokenizer_fix = "save one there with tokenizer.save_pretrained (the CLIPTokenizer of the same model)"
    # transformers 5 builds an empty-vocabulary CLIPTokenizer from a folder with no tokenizer
    # files instead of failing, and every prompt would then score 0.5; refuse such folders.
    if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
        raise ValueError(
            f"{what}: CLIP model folder {folder} has no usable tokenizer (no tokenizer.json or vocab.json); "
            f"{tokenizer_fix}"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ValueError(
            f"{what}: CLIP model folder {folder} has no usable tokenizer "
            f"({type(error).__name__}: {' '.join(str(error).split())}); {tokenizer_fix}"
        ) from error
    return model, tokenizer


def load_preprocessing(model_id: str, revision: str | None, image_size: int) -> ImagePreprocessing:
    """The checkpoint's image processor settings, or CLIP's defaults (logged) when it has none."""
    from transformers import CLIPImageProcessor

    what = f"label.clip_model_id {model_id!r}"
    if _looks_like_local_path(model_id):
        config = Path(model_id).expanduser() / PROCESSOR_CONFIG
        if not config.is_file():
            missing = f"folder {config.parent} has no {PROCESSOR_CONFIG}"
        else:
            try:
                processor = CLIPImageProcessor.from_pretrained(config.parent)
            except Exception as error:  # bad JSON, bad values: OSError, ValueError, TypeError
                raise ValueError(
                    f"{what}: {config} cannot be read as a CLIP image processor config "
                    f"({type(error).__name__}: {' '.join(str(error).split())}); fix or re-save it with "
                    "CLIPImageProcessor.save_pretrained, or delete it to use CLIP's defaults"
                ) from error
            return ImagePreprocessing.from_processor(processor, what, str(config))
    else:
        try:
            processor = CLIPImageProcessor.from_pretrained(model_id, revision=revision)
            return ImagePreprocessing.from_processor(
                processor, what, f"{model_id} (revision {revision or 'main'}) {PROCESSOR_CONFIG}"
            )
        except OSError as error:  # not in the repository, or not downloadable now and not cached
            missing = f"no {PROCESSOR_CONFIG} could be loaded ({' '.join(str(error).split())[:200]})"
    defaults = ImagePreprocessing.clip_defaults(image_size)
    logger.warning(
        "%s: %s; preprocessing with CLIP's defaults sized to the vision tower: shortest edge %d, centre crop "
        "%dx%d, bicubic, OpenAI mean/std", what, missing, image_size, image_size, image_size,
    )
    return defaults
