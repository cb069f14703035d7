"""The CLIP labeller: encodes the prompt pairs once, scores images by the pair softmax (see :mod:`hmine.clip`)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from hmine.clip.loading import load_clip, load_preprocessing
from hmine.clip.prompts import check_prompts


def _projected(features) -> torch.Tensor:
    """Projected embeddings from ``get_text_features`` / ``get_image_features``.

    transformers 4 returns the tensor itself; transformers 5 returns a
    ``BaseModelOutputWithPooling`` whose ``pooler_output`` holds the projection.
    """
    return features if torch.is_tensor(features) else features.pooler_output


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

        self.model, tokenizer = load_clip(self.model_id, revision)
        self.model.eval().to(self.device)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.preprocessing = load_preprocessing(self.model_id, revision, self.image_size)
        self._check_output_size(self.image_size, self.image_size)
        self._logit_scale = float(self.model.logit_scale.detach().exp())
        self._text_embeddings, self._pair_index = self._encode_prompts(tokenizer)


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
