"""Zero-shot attribute scores with CLIP: one (positive, negative) prompt pair per attribute.

For an image I and an attribute with prompts (P, N), the score is the softmax of CLIP's
image-text logits over the pair, i.e. P(P | I, {P, N}) in [0, 1] (Haas et al. 2024 score
edits this way, e.g. "a photo of a smiling person" against "a photo of a person").
Works with a hub id (``openai/clip-vit-base-patch32``) or a local folder alike.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

# CLIP's image normalisation (the constants of its image processor)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _check_prompts(prompts) -> dict[str, tuple[str, str]]:
    if not prompts:
        raise ValueError("label.clip_prompts is empty; give attribute: [positive prompt, negative prompt]")
    checked = {}
    for attribute, pair in prompts.items():
        if not isinstance(pair, (tuple, list)) or len(pair) != 2 or not all(isinstance(p, str) and p.strip() for p in pair):
            raise ValueError(
                f"label.clip_prompts[{attribute!r}] must be two non-empty prompts "
                f"[positive, negative], got {pair!r}"
            )
        checked[str(attribute)] = (pair[0], pair[1])
    return checked


class ClipLabeller:
    """Scores images for attributes given as CLIP prompt pairs.

    Parameters
    ----------
    prompts : dict of str to (str, str)
        attribute -> (positive prompt, negative prompt).
    model_id : str, default="openai/clip-vit-base-patch32"
        Hub id or local folder holding a ``CLIPModel`` and its tokenizer.
    revision : str, optional
    device : str, default="cpu"
    batch_size : int, default=64
    """

    name = "clip"

    def __init__(self, prompts, model_id: str = "openai/clip-vit-base-patch32", *, revision=None, device: str = "cpu", batch_size: int = 64):
        from transformers import AutoTokenizer, CLIPModel

        self.prompts = _check_prompts(prompts)
        self.attributes = tuple(self.prompts)
        self.batch_size = batch_size
        self.device = device
        if (model_id.startswith((".", "/")) or Path(model_id).exists()) and not (Path(model_id) / "config.json").exists():
            raise FileNotFoundError(
                f"CLIP folder {model_id} has no config.json; set label.clip_model_id to a hub id "
                "or to a folder saved with CLIPModel.save_pretrained"
            )
        self.model = CLIPModel.from_pretrained(model_id, revision=revision).eval().to(device)
        tokenizer = AutoTokenizer.from_pretrained(model_id, revision=revision)
        texts = [p for pair in self.prompts.values() for p in pair]
        tokens = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.inference_mode():
            text = self.model.get_text_features(**{k: v.to(device) for k, v in tokens.items()})
            text = text if torch.is_tensor(text) else text.pooler_output
        self.text_embeddings = torch.nn.functional.normalize(text.float(), dim=-1)  # (2 * n_attr, d)
        self.image_size = int(self.model.config.vision_config.image_size)

    def preprocess(self, images) -> torch.Tensor:
        """Images (n, 3, H, W) in [-1, 1] to CLIP pixel values, as CLIP's image processor does."""
        x = torch.as_tensor(np.asarray(images, dtype=np.float32)) if not torch.is_tensor(images) else images.float()
        x = (x.clamp(-1, 1) + 1) / 2
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)  # shorter side to image_size, then centre crop
        size = (max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale)))
        x = torch.nn.functional.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        top, left = (size[0] - self.image_size) // 2, (size[1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.inference_mode()
    def score(self, images) -> pd.DataFrame:
        scores = []
        for start in range(0, len(images), self.batch_size):
            pixels = self.preprocess(images[start : start + self.batch_size]).to(self.device)
            image = self.model.get_image_features(pixel_values=pixels)
            image = image if torch.is_tensor(image) else image.pooler_output
            image = torch.nn.functional.normalize(image.float(), dim=-1)
            logits = self.model.logit_scale.exp() * image @ self.text_embeddings.T  # (n, 2 * n_attr)
            pairs = logits.view(len(pixels), len(self.attributes), 2).softmax(dim=-1)[..., 0]
            scores.append(pairs.double().cpu().numpy())
        return pd.DataFrame(np.concatenate(scores), columns=list(self.attributes))
