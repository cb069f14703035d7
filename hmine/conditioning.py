"""Text conditioning of the sampler's U-Net calls: prompt embeddings, guidance branches, h rows.

With classifier-free guidance a U-Net call for B images is a batch of 2B rows, as in
diffusers' ``StableDiffusionPipeline``: the unconditional branch (the negative prompt,
or the empty prompt) first, the conditional branch (each image's prompt) second. The
guided output is ``uncond + guidance_scale * (cond - uncond)``, the pipeline's expression.
At guidance scale 1 only the conditional branch runs (B rows).

h is then recorded for 2B rows; :meth:`TextConditioning.branch_rows` keeps those of the
branch the config names (``sample.text.h_branch``), and :meth:`TextConditioning.delta_rows`
lays an edit's delta out over the rows of the branches it applies to
(``sample.text.edit_branches``), zero in the others.

Each prompt is encoded alone (batch 1) and cached, so a prompt's embedding, and hence a
sample, does not depend on which other prompts share its batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hmine.prompts import TextConfig
from hmine.text_models import encode_prompt

#: Prompt embeddings kept per sampler (SD 1.x: 77 x 768 float32, 0.24 MB each).
CACHED_PROMPTS = 1024


class TextConditioning:
    """Prompt embeddings and guidance for a text-conditional model.

    Parameters
    ----------
    model : hmine.models.DiffusionModel
        A text-conditional model (``model.text_conditional``).
    text : hmine.prompts.TextConfig
        Prompts, negative prompt, guidance scale and branches.

    Raises
    ------
    ValueError
        The model takes no text, or the negative prompt is over the tokenizer's limit.
    """

    def __init__(self, model, text: TextConfig):
        if not model.text_conditional:
            raise ValueError(
                f"sample.text is set but model.id {model.model_id!r} is not text-conditional (no text_encoder/); "
                "remove sample.text or use a text-to-image model"
            )
        self.model = model
        self.config = text
        self._cache: dict[str, torch.Tensor] = {}
        self.prompt_field = "sample.text.prompts" if text.prompts is not None else "sample.text.template"
        self.unconditional = (
            self.embed(text.negative_prompt or "", "sample.text.negative_prompt") if text.guided else None
        )

    @property
    def branches(self) -> int:
        """U-Net rows per image: 2 with guidance (unconditional, conditional), else 1."""
        return 2 if self.config.guided else 1

    def embed(self, prompt: str, field: str | None = None) -> torch.Tensor:
        """The text encoder's states (1, tokens, hidden) of one prompt, cached."""
        if prompt not in self._cache:
            if len(self._cache) >= CACHED_PROMPTS:  # drop the oldest: an embedding is the same bits when redone
                self._cache.pop(next(iter(self._cache)))
            self._cache[prompt] = encode_prompt(
                self.model.text_encoder, self.model.tokenizer, prompt, field=field or self.prompt_field
            )
        return self._cache[prompt]

    def check_prompts(self, prompts: Sequence[str], field: str | None = None) -> None:
        """Encode (and so length-check) every prompt up front: a bad one fails before any sampling."""
        for prompt in dict.fromkeys(prompts):
            self.embed(prompt, field)

    def context(self, prompts: Sequence[str], rows: int | None = None, *, like: torch.Tensor | None = None) -> torch.Tensor:
        """``encoder_hidden_states`` of one call: (branches * rows, tokens, hidden).

        ``rows`` pads the batch beyond ``len(prompts)`` (with the first prompt; padded
        rows' outputs are discarded); ``like`` gives the device and dtype.
        """
        rows = len(prompts) if rows is None else rows
        if not prompts or rows < len(prompts):
            raise ValueError(f"{len(prompts)} prompts for {rows} rows; give one prompt per row")
        cond = torch.cat([self.embed(p) for p in prompts] + [self.embed(prompts[0])] * (rows - len(prompts)))
        states = cond if not self.config.guided else torch.cat([self.unconditional.expand(rows, -1, -1), cond])
        return states if like is None else states.to(device=like.device, dtype=like.dtype)

    def combine(self, output: torch.Tensor, rows: int) -> torch.Tensor:
        """The guided output of every image from a call's raw output.

        ``output`` holds ``k * branches * rows`` rows (k = 2 for a branched call,
        :mod:`hmine.branching`); each group of ``branches * rows`` is guided on its own.
        """
        if not self.config.guided:
            return output
        groups = output.reshape(-1, 2, rows, *output.shape[1:])
        uncond, cond = groups[:, 0], groups[:, 1]
        guided = uncond + self.config.guidance_scale * (cond - uncond)
        return guided.reshape(-1, *output.shape[1:])

    def branch_rows(self, h: torch.Tensor, rows: int) -> torch.Tensor:
        """The rows of ``sample.text.h_branch`` from h of one call (branches * rows, ...)."""
        if not self.config.guided:
            return h
        return h[:rows] if self.config.h_branch == "unconditional" else h[rows : 2 * rows]

    def delta_rows(self, delta: torch.Tensor, rows: int) -> torch.Tensor:
        """An h delta, (C, y, x) or (rows, C, y, x), laid out over a call's (branches * rows) h rows."""
        if not self.config.guided:
            return delta
        where = self.config.edit_branches
        if where == "both":
            return delta if delta.ndim == 3 else torch.cat([delta, delta])
        per_row = delta.expand(rows, *delta.shape[-3:])
        zero = torch.zeros_like(per_row)
        return torch.cat([per_row, zero] if where == "unconditional" else [zero, per_row])
