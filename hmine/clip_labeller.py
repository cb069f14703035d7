"""Zero-shot attribute scores with CLIP: one (positive, negative) prompt pair per attribute.

For an image ``I`` and an attribute with prompts ``(P, N)`` the score is CLIP's softmax over
the pair,

    score = exp(s * cos(I, P)) / (exp(s * cos(I, P)) + exp(s * cos(I, N))),

with ``s = logit_scale.exp()``: the probability CLIP gives the positive prompt when it must
choose between the two. Scores lie in [0, 1] like every other labeller's binary attributes
(:mod:`hmine.labelling`), so a direction's effect reads as a change in probability, e.g.
``"smiling": ("a photo of a smiling person", "a photo of a person")``.

Images are preprocessed with torch alone (no torchvision, no PIL round trip), the way
transformers' ``CLIPImageProcessor`` does it: shorter side resized to the vision tower's
``image_size`` (bicubic, antialiased), centre crop, CLIP's mean/std normalisation.
The model loads with ``CLIPModel.from_pretrained`` from a hub id or a local folder alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

# The normalisation constants of CLIP's image processor (OPENAI_CLIP_MEAN / _STD).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

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


def resize_and_crop(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Resize the shorter side to ``image_size`` (bicubic, antialiased), then centre-crop a square.

    Sizes follow transformers' CLIP image processor: the longer side becomes
    ``int(image_size * long / short)`` (truncated, not rounded) and the crop starts at
    ``(side - image_size) // 2``.

    Parameters
    ----------
    images : torch.Tensor
        Float images (n, C, H, W).
    image_size : int
        Side of the square output.

    Returns
    -------
    torch.Tensor
        Images (n, C, image_size, image_size).
    """
    height, width = images.shape[-2:]
    short_side, long_side = min(height, width), max(height, width)
    new_long = int(image_size * long_side / short_side)
    new_height, new_width = (new_long, image_size) if height > width else (image_size, new_long)
    if (new_height, new_width) != (height, width):
        images = F.interpolate(
            images, size=(new_height, new_width), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = (new_height - image_size) // 2, (new_width - image_size) // 2
    return images[..., top : top + image_size, left : left + image_size]


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

    Raises
    ------
    ValueError
        Bad prompts, a bad ``batch_size``, a prompt longer than the text tower takes, or a
        local folder whose model or tokenizer cannot be loaded.
    FileNotFoundError
        ``model_id`` is a local path that does not exist or holds no ``config.json``.
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
        self._mean = torch.tensor(CLIP_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=self.device).view(1, 3, 1, 1)
        self._logit_scale = float(self.model.logit_scale.detach().exp())
        self._text_embeddings, self._pair_index = self._encode_prompts(tokenizer)

    @staticmethod
    def _load(model_id: str, revision: str | None):
        """Load ``CLIPModel`` and its tokenizer, turning loader failures into errors that say what to do."""
        from transformers import AutoTokenizer, CLIPModel

        if not _looks_like_local_path(model_id):
            try:
                return (
                    CLIPModel.from_pretrained(model_id, revision=revision),
                    AutoTokenizer.from_pretrained(model_id, revision=revision),
                )
            except OSError as error:
                raise OSError(
                    f"could not load CLIP model {model_id!r} (revision {revision or 'main'}) from the hub or the "
                    "local cache; download it once with network access, or set model_id to a local folder "
                    f"saved with CLIPModel.save_pretrained and tokenizer.save_pretrained ({error})"
                ) from error

        folder = Path(model_id).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CLIP model folder {folder} does not exist; set model_id to a folder saved with "
                "CLIPModel.save_pretrained (plus its tokenizer) or to a hub id such as 'openai/clip-vit-base-patch32'"
            )
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"CLIP model folder {folder} has no config.json; save the model there with "
                "CLIPModel.save_pretrained, or set model_id to a hub id"
            )
        try:
            model = CLIPModel.from_pretrained(folder)
        except Exception as error:  # corrupt weights or config raise many types (OSError, SafetensorError, ...)
            raise ValueError(
                f"CLIP model folder {folder} could not be loaded as a CLIPModel ({type(error).__name__}: {error}); "
                "re-save it with CLIPModel.save_pretrained"
            ) from error
        tokenizer_fix = "save one there with tokenizer.save_pretrained (the CLIPTokenizer of the same model)"
        # transformers 5 builds an empty-vocabulary CLIPTokenizer from a folder with no tokenizer
        # files instead of failing, and every prompt would then score 0.5; refuse such folders.
        if not any((folder / name).is_file() for name in ("tokenizer.json", "vocab.json")):
            raise ValueError(
                f"CLIP model folder {folder} has no usable tokenizer (no tokenizer.json or vocab.json); {tokenizer_fix}"
            )
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder)
        except Exception as error:
            raise ValueError(
                f"CLIP model folder {folder} has no usable tokenizer ({type(error).__name__}: {error}); {tokenizer_fix}"
            ) from error
        return model, tokenizer

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
            Float32 pixel values (n, 3, image_size, image_size) on the labeller's device.

        Raises
        ------
        ValueError
            If ``images`` is not (n, 3, H, W).
        """
        # ascontiguousarray: torch cannot view numpy arrays with negative strides (e.g. flipped ones).
        pixels = images if torch.is_tensor(images) else torch.from_numpy(np.ascontiguousarray(images))
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"CLIP scores RGB images shaped (n, 3, H, W), got shape {tuple(pixels.shape)}")
        pixels = pixels.to(self.device, torch.float32)
        pixels = (pixels.clamp(-1.0, 1.0) + 1.0) / 2.0
        pixels = resize_and_crop(pixels, self.image_size)
        # Bicubic overshoots past [0, 1] at edges; CLIP's processor resizes 8-bit images,
        # which clips there, so clip too.
        pixels = pixels.clamp(0.0, 1.0)
        return (pixels - self._mean) / self._std

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
