"""Zero-shot attribute scores with CLIP: one (positive, negative) prompt pair per attribute.

For an image ``I`` and an attribute with prompts ``(P, N)`` the score is CLIP's softmax over
the pair,

    score = exp(s * cos(I, P)) / (exp(s * cos(I, P)) + exp(s * cos(I, N))),

with ``s = logit_scale.exp()``: the probability CLIP gives the positive prompt when it must
choose between the two. Scores lie in [0, 1] like every other labeller's binary attributes
(:mod:`hmine.labelling`), so a direction's effect reads as a change in probability, e.g.
``"smiling": ("a photo of a smiling person", "a photo of a person")``.

Images are preprocessed with torch alone (no torchvision, no PIL round trip), following
the checkpoint's own image processor settings (its ``preprocessor_config.json``, read with
transformers' ``CLIPImageProcessor``): resize (shortest edge or exact size, with its
resample filter, antialiased), centre crop, its mean/std normalisation
(:class:`ImagePreprocessing`). A checkpoint without a processor config gets CLIP's defaults
sized to its vision tower, and a log line says so. The model loads with
``CLIPModel.from_pretrained(..., use_safetensors=True)`` from a hub id or a local folder alike.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# The normalisation constants of CLIP's image processor (OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROCESSOR_CONFIG = "preprocessor_config.json"

# PIL resample codes (what preprocessor_config.json stores) -> torch interpolation modes.
# torch's antialiased bilinear/bicubic use PIL's kernels; PIL's nearest is torch's nearest-exact.
_RESAMPLE_MODES = {0: "nearest-exact", 2: "bilinear", 3: "bicubic"}
_RESAMPLE_NAMES = {"nearest": 0, "nearest-exact": 0, "nearest_exact": 0, "bilinear": 2, "bicubic": 3}

_PROMPTS_FIX = (
    'give each attribute a pair of prompts, e.g. {"smiling": ("a photo of a smiling person", "a photo of a person")}'
)


def check_prompts(prompts) -> dict[str, tuple[str, str]]:
    """Validate attribute prompt pairs.

    Parameters
    ----------
    prompts : mapping of str to (str, str)
        Attribute name -> (positive prompt, negative prompt).

    Returns
    -------
    dict of str to (str, str)
        The same pairs as tuples, in the given order.

    Raises
    ------
    ValueError
        If there are no attributes, a name is empty, or a value is not two different
        non-empty strings; the message names the attribute and the fix.
    """
    if not isinstance(prompts, dict) or not prompts:
        raise ValueError(f"CLIP prompts are empty or not a dict (got {prompts!r}); {_PROMPTS_FIX}")
    checked = {}
    for attribute, pair in prompts.items():
        if not isinstance(attribute, str) or not attribute.strip():
            raise ValueError(f"CLIP prompt attribute names must be non-empty strings, got {attribute!r}")
        # A bare string is a sequence too; reject it explicitly rather than unpacking characters.
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"CLIP prompts for attribute {attribute!r} must be a pair (positive, negative), got {pair!r}; "
                f"{_PROMPTS_FIX}"
            )
        positive, negative = pair
        if not all(isinstance(p, str) and p.strip() for p in pair):
            raise ValueError(
                f"CLIP prompts for attribute {attribute!r} must be two non-empty strings, got {pair!r}; "
                f"{_PROMPTS_FIX}"
            )
        if positive.strip() == negative.strip():
            # Identical prompts would score exactly 0.5 for every image.
            raise ValueError(
                f"CLIP prompts for attribute {attribute!r} are the same text {positive!r}; "
                "the negative prompt must describe the image without the attribute"
            )
        checked[attribute] = (positive, negative)
    return checked


def _looks_like_local_path(model_id: str) -> bool:
    """True when ``model_id`` can only be a folder (hub ids are ``name`` or ``owner/name``)."""
    return (
        Path(model_id).expanduser().exists()
        or model_id.startswith(("/", ".", "~"))
        or model_id.count("/") > 1
        or "\\" in model_id
    )


def _projected(features) -> torch.Tensor:
    """Projected embeddings from ``get_text_features`` / ``get_image_features``.

    transformers 4 returns the tensor itself; transformers 5 returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projection.
    """
    return features if torch.is_tensor(features) else features.pooler_output


def _size_entry(size, key: str):
    """``size[key]`` of a processor size: a dict (transformers 4) or a SizeDict (transformers 5)."""
    if isinstance(size, dict):
        return size.get(key)
    return getattr(size, key, None)


def _three(values, name: str, what: str) -> tuple[float, float, float]:
    values = [float(values)] * 3 if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != 3:
        raise ValueError(f"{what}: {PROCESSOR_CONFIG} {name} has {len(values)} entries, expected 3 (RGB)")
    return tuple(values)


@dataclass(frozen=True)
class ImagePreprocessing:
    """What a checkpoint's CLIP image processor does to an image, done with torch.

    Applied to images in [0, 1] (the labeller maps its [-1, 1] images there, which stands in
    for the processor's rescaling of 8-bit pixels), in the processor's order: resize, centre
    crop, normalise.

    Attributes
    ----------
    do_resize : bool
    shortest_edge : int or None
        Resize the shorter side to this, the longer to ``int(shortest_edge * long / short)``
        (truncated, as transformers does); None when resizing to (height, width).
    height, width : int or None
        Exact resize size, used when ``shortest_edge`` is None.
    resample : str
        torch interpolation mode: "bicubic", "bilinear" (both antialiased, like PIL) or
        "nearest-exact" (PIL's nearest).
    do_center_crop : bool
    crop_height, crop_width : int
        The crop starts at ``(side - crop) // 2``; an image smaller than the crop is padded
        with zeros (black) first, as transformers does.
    do_normalize : bool
    image_mean, image_std : tuple of float
    source : str
        Where the settings came from, for messages.
    """

    do_resize: bool = True
    shortest_edge: int | None = 224
    height: int | None = None
    width: int | None = None
    resample: str = "bicubic"
    do_center_crop: bool = True
    crop_height: int = 224
    crop_width: int = 224
    do_normalize: bool = True
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD
    source: str = "CLIP's default image processor"

    @classmethod
    def clip_defaults(cls, image_size: int) -> "ImagePreprocessing":
        """CLIP's defaults (shortest edge, centre crop, bicubic, OpenAI mean/std) sized to the vision tower."""
        return cls(shortest_edge=image_size, crop_height=image_size, crop_width=image_size,
                   source=f"CLIP's default image processor sized to {image_size}")

    @classmethod
    def from_processor(cls, processor, what: str, source: str) -> "ImagePreprocessing":
        """Settings of a transformers ``CLIPImageProcessor`` (as loaded from ``preprocessor_config.json``).

        Raises
        ------
        ValueError
            Settings torch cannot follow (a resample filter other than nearest, bilinear or
            bicubic; a size other than shortest_edge alone or height and width; rescaling
            other than 1/255); the message starts with ``what`` and names the setting.
        """
        fix = f"use a checkpoint whose {PROCESSOR_CONFIG} hmine can follow, or edit that file"
        do_resize = bool(getattr(processor, "do_resize", True))
        size = getattr(processor, "size", None)
        if isinstance(size, int):  # old configs: an int is the shortest edge
            size = {"shortest_edge": size}
        shortest_edge, height, width = (_size_entry(size, key) for key in ("shortest_edge", "height", "width"))
        if do_resize and (_size_entry(size, "longest_edge") or not (shortest_edge or (height and width))):
            raise ValueError(
                f"{what}: {PROCESSOR_CONFIG} size {size!r} is neither shortest_edge alone nor height and width; {fix}"
            )
        resample = getattr(processor, "resample", 3)
        try:
            code = int(resample)
        except (TypeError, ValueError):  # a torchvision InterpolationMode or a name
            code = _RESAMPLE_NAMES.get(str(getattr(resample, "value", resample)).lower())
        if do_resize and code not in _RESAMPLE_MODES:
            raise ValueError(
                f"{what}: {PROCESSOR_CONFIG} resample={resample!r} is not nearest (0), bilinear (2) or "
                f"bicubic (3), the filters torch can follow; {fix}"
            )
        rescale_factor = float(getattr(processor, "rescale_factor", 1 / 255))
        if getattr(processor, "do_rescale", True) and abs(rescale_factor - 1 / 255) > 1e-9:
            raise ValueError(
                f"{what}: {PROCESSOR_CONFIG} rescale_factor={rescale_factor} does not map 8-bit pixels to [0, 1]; {fix}"
            )
        crop = getattr(processor, "crop_size", None)
        if isinstance(crop, int):
            crop = {"height": crop, "width": crop}
        do_center_crop = bool(getattr(processor, "do_center_crop", True))
        crop_height, crop_width = _size_entry(crop, "height"), _size_entry(crop, "width")
        if do_center_crop and not (crop_height and crop_width):
            raise ValueError(f"{what}: {PROCESSOR_CONFIG} crop_size {crop!r} has no height and width; {fix}")
        return cls(
            do_resize=do_resize,
            shortest_edge=int(shortest_edge) if shortest_edge else None,
            height=int(height) if height and not shortest_edge else None,
            width=int(width) if width and not shortest_edge else None,
            resample=_RESAMPLE_MODES.get(code, "bicubic"),
            do_center_crop=do_center_crop,
            crop_height=int(crop_height or 0),
            crop_width=int(crop_width or 0),
            do_normalize=bool(getattr(processor, "do_normalize", True)),
            image_mean=_three(getattr(processor, "image_mean", CLIP_MEAN), "image_mean", what),
            image_std=_three(getattr(processor, "image_std", CLIP_STD), "image_std", what),
            source=source,
        )

    def resized_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) after the resize step (transformers' ``get_resize_output_image_size``)."""
        if not self.do_resize:
            return height, width
        if self.shortest_edge is None:
            return self.height, self.width
        short_side, long_side = (width, height) if width <= height else (height, width)
        new_long = int(self.shortest_edge * long_side / short_side)
        return (new_long, self.shortest_edge) if width <= height else (self.shortest_edge, new_long)

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the pixel values for an input of (height, width)."""
        if self.do_center_crop:
            return self.crop_height, self.crop_width
        return self.resized_size(height, width)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Pixel values from float images (n, C, H, W) in [0, 1]."""
        new_size = self.resized_size(*images.shape[-2:])
        if new_size != tuple(images.shape[-2:]):  # PIL returns a same-size resize unchanged
            antialias = self.resample != "nearest-exact"
            extra = {"align_corners": False} if antialias else {}
            images = F.interpolate(images, size=new_size, mode=self.resample, antialias=antialias, **extra)
            # Bicubic overshoots past [0, 1] at edges; the processor resizes 8-bit images,
            # which clips there, so clip too.
            images = images.clamp(0.0, 1.0)
        if self.do_center_crop:
            images = center_crop(images, self.crop_height, self.crop_width)
        if self.do_normalize:
            mean = torch.tensor(self.image_mean, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
            std = torch.tensor(self.image_std, device=images.device, dtype=images.dtype).view(1, -1, 1, 1)
            images = (images - mean) / std
        return images


def center_crop(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Centre crop to (height, width) as transformers' ``center_crop`` does.

    The crop starts at ``(side - crop) // 2``; an image smaller than the crop is first
    padded with zeros, ``ceil((crop - side) / 2)`` before it.
    """
    in_height, in_width = images.shape[-2:]
    pad_height, pad_width = max(height - in_height, 0), max(width - in_width, 0)
    if pad_height or pad_width:
        top_pad, left_pad = (pad_height + 1) // 2, (pad_width + 1) // 2
        images = F.pad(images, (left_pad, pad_width - left_pad, top_pad, pad_height - top_pad))
        in_height, in_width = images.shape[-2:]
    top, left = (in_height - height) // 2, (in_width - width) // 2
    return images[..., top : top + height, left : left + width]


class ClipLabeller:
    """Zero-shot attribute probabilities from CLIP prompt pairs.

    Parameters
    ----------
    prompts : dict of str to (str, str)
        Attribute name -> (positive prompt, negative prompt).
    model_id : str, default="openai/clip-vit-base-patch32"
        Hub id, or a local folder saved with ``CLIPModel.save_pretrained`` that also holds
        the tokenizer (``tokenizer.save_pretrained``).
    revision : str, optional
        Hub revision (branch, tag or commit); ignored for a local folder.
    device : str or torch.device, default="cpu"
    batch_size : int, default=64
        Images encoded per forward pass.

    Attributes
    ----------
    attributes : tuple of str
        Attribute names, in the order of ``prompts`` and of the score columns.
    name : str
        ``"clip"``.
    image_size : int
        Side of the square images the vision tower takes.
    preprocessing : ImagePreprocessing
        The checkpoint's image processor settings (``preprocessor_config.json``), or CLIP's
        defaults sized to the vision tower when it has none (a warning is logged).

    Raises
    ------
    ValueError
        Bad prompts, a bad ``batch_size``, a prompt longer than the text tower takes, a local
        folder whose model, tokenizer or processor config cannot be loaded or whose weights
        are not safetensors, or processor settings that do not give the vision tower's size.
    FileNotFoundError
        ``model_id`` is a local path that does not exist, holds no ``config.json`` or no
        ``model.safetensors`` (nor its shard index).
    """

    name = "clip"

    def __init__(
        self,
        prompts: dict[str, tuple[str, str]],
        model_id: str = "openai/clip-vit-base-patch32",
        *,
        revision: str | None = None,
        device: str | torch.device = "cpu",
        batch_size: int = 64,
    ):
        self.prompts = check_prompts(prompts)
        self.attributes = tuple(self.prompts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = torch.device(device)
        self.model_id = str(model_id)
        self.revision = revision

        self.model, tokenizer = self._load(self.model_id, revision)
        self.model.eval().to(self.device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.preprocessing = self._load_preprocessing(self.model_id, revision, self.image_size)
        self._check_output_size(self.image_size, self.image_size)
        self._logit_scale = float(self.model.logit_scale.detach().exp())
        self._text_embeddings, self._pair_index = self._encode_prompts(tokenizer)

    @staticmethod
    def _load(model_id: str, revision: str | None):
        """Load ``CLIPModel`` (safetensors only) and its tokenizer, turning loader failures into errors that say what to do."""
        from transformers import AutoTokenizer, CLIPModel

        from hmine.models import check_safetensors_weights

        what = f"label.clip_model_id {model_id!r}"
        if not _looks_like_local_path(model_id):
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

        folder = Path(model_id).expanduser()
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

    @staticmethod
    def _load_preprocessing(model_id: str, revision: str | None, image_size: int) -> ImagePreprocessing:
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

    def _check_output_size(self, height: int, width: int) -> None:
        """Refuse preprocessing that would not give the vision tower's square images."""
        size = self.preprocessing.output_size(height, width)
        if size != (self.image_size, self.image_size):
            raise ValueError(
                f"label.clip_model_id {self.model_id!r}: {self.preprocessing.source} turns {height}x{width} images "
                f"into {size[0]}x{size[1]} pixel values, but the vision tower takes "
                f"{self.image_size}x{self.image_size}; set crop_size (or size) there to {self.image_size}"
            )

    @torch.inference_mode()
    def _encode_prompts(self, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-norm text embeddings of the distinct prompts, and each attribute's (positive, negative) rows."""
        # Attributes often share a negative prompt ("a photo of a person"): encode each text once.
        texts = list(dict.fromkeys(p for pair in self.prompts.values() for p in pair))
        row_of = {text: row for row, text in enumerate(texts)}
        pair_index = torch.tensor([[row_of[p], row_of[n]] for p, n in self.prompts.values()], device=self.device)

        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        max_tokens = int(self.model.config.text_config.max_position_embeddings)
        lengths = tokens["attention_mask"].sum(dim=1)
        too_long = [text for text, length in zip(texts, lengths.tolist()) if length > max_tokens]
        if too_long:
            # Truncation would silently score a different prompt; make the user shorten it.
            raise ValueError(f"CLIP prompts longer than the text tower's {max_tokens} tokens: {too_long}; shorten them")
        unknown = [text for text, count in zip(texts, self._count_unknown_tokens(tokenizer, tokens).tolist()) if count]
        if unknown:
            raise ValueError(
                f"the CLIP tokenizer of {self.model_id} does not know some characters of the prompts {unknown}; "
                "rewrite them, or check that the model folder holds the model's own tokenizer"
            )
        tokens = {key: value.to(self.device) for key, value in tokens.items()}
        text = _projected(self.model.get_text_features(**tokens))
        return F.normalize(text.float(), dim=-1), pair_index

    @staticmethod
    def _count_unknown_tokens(tokenizer, tokens) -> torch.Tensor:
        """Unknown tokens per prompt, between its start and end tokens.

        CLIP's unknown token is ``<|endoftext|>``, which also ends (and pads) every prompt,
        so only the positions strictly inside each prompt count.
        """
        if tokenizer.unk_token_id is None:
            return torch.zeros(len(tokens["input_ids"]), dtype=torch.long)
        inside = tokens["attention_mask"].bool().clone()
        lengths = inside.sum(dim=1)
        inside[:, 0] = False
        inside[torch.arange(len(inside)), lengths - 1] = False
        return ((tokens["input_ids"] == tokenizer.unk_token_id) & inside).sum(dim=1)

    def preprocess(self, images) -> torch.Tensor:
        """Turn diffusion images into CLIP pixel values.

        Parameters
        ----------
        images : torch.Tensor or numpy.ndarray
            Images (n, 3, H, W) with values in [-1, 1]; values outside are clipped, as
            saving them as an image file would.

        Returns
        -------
        torch.Tensor
            Float32 pixel values (n, 3, image_size, image_size) on the labeller's device,
            made by :attr:`preprocessing` (the checkpoint's processor settings).

        Raises
        ------
        ValueError
            If ``images`` is not (n, 3, H, W), or the processor settings do not turn
            H x W images into the vision tower's size.
        """
        # ascontiguousarray: torch cannot view numpy arrays with negative strides (e.g. flipped ones).
        pixels = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"CLIP scores RGB images shaped (n, 3, H, W), got shape {tuple(pixels.shape)}")
        self._check_output_size(*pixels.shape[-2:])
        pixels = pixels.to(self.device, torch.float32)
        # [-1, 1] -> [0, 1]: what the processor's rescaling makes of 8-bit pixels
        pixels = (pixels.clamp(-1.0, 1.0) + 1.0) / 2.0
        return self.preprocessing(pixels)

    @torch.inference_mode()
    def score(self, images) -> pd.DataFrame:
        """Probability of each attribute's positive prompt against its negative one.

        Parameters
        ----------
        images : torch.Tensor or numpy.ndarray
            Images (n, 3, H, W) with values in [-1, 1].

        Returns
        -------
        pandas.DataFrame
            n rows in image order, one float64 column per attribute, values in [0, 1].
        """
        n_images = len(images)
        batches = []
        dtype = next(self.model.parameters()).dtype
        for start in range(0, n_images, self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(dtype)
            image = F.normalize(_projected(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)
            logits = self._logit_scale * image @ self._text_embeddings.T  # (batch, distinct prompts)
            pair_logits = logits[:, self._pair_index]  # (batch, attributes, [positive, negative])
            batches.append(pair_logits.softmax(dim=-1)[..., 0].double().cpu().numpy())
        values = np.concatenate(batches) if batches else np.empty((0, len(self.attributes)))
        return pd.DataFrame(values, columns=list(self.attributes), dtype=np.float64)
