"""The text-conditional shapes-world model: tokenizer, text encoder, U-Net and scheduler.

Stable-Diffusion layout in pixel space (no VAE): a ``CLIPTokenizer`` with whole-word tokens
for the caption vocabulary (:func:`hmine.textworld.captions.vocabulary`) and single
characters for anything else, a tiny ``CLIPTextModel`` trained jointly with the U-Net, a
``UNet2DConditionModel`` on 32x32 RGB with cross-attention in its down, mid and up blocks,
and a v-prediction ``DDPMScheduler`` (the linear schedule of the unconditional embedded
model). Everything is built offline; nothing is fetched from the hub.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from hmine import world
from hmine.textworld import captions

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
_ASCII = [chr(code) for code in range(33, 127)]


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE of one word: repeatedly join the adjacent pair of lowest merge rank."""
    pieces = list(word[:-1]) + [word[-1] + "</w>"]
    while len(pieces) > 1:
        pairs = [(ranks.get((a, b), float("inf")), i) for i, (a, b) in enumerate(zip(pieces, pieces[1:]))]
        rank, _ = min(pairs)
        if rank == float("inf"):
            break
        pair = min((a, b) for r, i in pairs if r == rank for a, b in [(pieces[i], pieces[i + 1])])
        joined, i = [], 0
        while i < len(pieces):
            if i + 1 < len(pieces) and (pieces[i], pieces[i + 1]) == pair:
                joined.append(pieces[i] + pieces[i + 1])
                i += 2
            else:
                joined.append(pieces[i])
                i += 1
        pieces = joined
    return pieces


def _whole_word_merges(words: list[str]) -> list[tuple[str, str]]:
    """Merges under which every word of ``words`` is one token.

    Each word's merges are appended (lowest priority) until BPE joins it into one token;
    this repeats over all words until none changes, since a later word's merges could in
    principle split an earlier one.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for _ in range(100):
        changed = False
        for word in words:
            pieces = _bpe(word, ranks)
            while len(pieces) > 1:
                pair = (pieces[0], pieces[1])
                ranks[pair] = len(merges)
                merges.append(pair)
                changed = True
                pieces = _bpe(word, ranks)
        if not changed:
            return merges
    raise RuntimeError("no merge list makes every caption word a single token")


def write_tokenizer(folder: Path, max_length: int) -> Path:
    """Write a CLIP BPE tokenizer whose vocabulary words are single tokens.

    Byte-level BPE maps printable ASCII to itself, so every character (and its ``</w>``
    end-of-word variant) is in the vocabulary and any text tokenizes; merges join the
    characters of each caption word into one token. ``<|endoftext|>`` pads, as in
    Stable Diffusion 1.x, and ``model_max_length`` is ``max_length``.
    """
    from transformers import CLIPTokenizer

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokens = [BOS, EOS] + _ASCII + [c + "</w>" for c in _ASCII]
    merges = _whole_word_merges(captions.vocabulary())
    for left, right in merges:
        if left + right not in tokens:
            tokens.append(left + right)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    # from_pretrained on the folder, not CLIPTokenizer(vocab_file=...): transformers 5
    # ignores those arguments (see tests/conftest.py).
    tokenizer = CLIPTokenizer.from_pretrained(folder, model_max_length=max_length, pad_token=EOS)
    tokenizer.save_pretrained(folder)
    return folder


def build_tokenizer(folder: Path, max_length: int):
    """Write the tokenizer into ``folder`` and load it back."""
    from transformers import CLIPTokenizer

    write_tokenizer(folder, max_length)
    return CLIPTokenizer.from_pretrained(folder)


def tokenize(tokenizer, texts: list[str]) -> torch.Tensor:
    """Token ids (n, model_max_length) padded with ``<|endoftext|>``, as StableDiffusionPipeline does."""
    return tokenizer(
        list(texts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def build_text_encoder(config, vocab_size: int):
    """A tiny CLIP text tower (pad/eos = ``<|endoftext|>``, id 1; bos id 0)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(
        CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=config.text_hidden_size,
            intermediate_size=config.text_intermediate_size,
            num_hidden_layers=config.text_layers,
            num_attention_heads=config.text_heads,
            max_position_embeddings=config.max_tokens,
            projection_dim=config.text_hidden_size,
            bos_token_id=0,
            eos_token_id=1,
            pad_token_id=1,
        )
    )


def build_unet(config):
    """A pixel-space ``UNet2DConditionModel`` on 32x32 RGB: 32 -> 16 -> 8 with cross-attention at the bottom.

    The last ``cross_attention_levels`` resolution levels (down and up) and the mid block
    have a transformer after each ResNet block (self-attention, cross-attention to the
    text, feed-forward); the levels above are plain ResNet blocks.
    h, the mid-block output, is ``block_out_channels[-1]`` x 8 x 8, like the unconditional
    embedded model's.
    """
    from diffusers import UNet2DConditionModel

    n = len(config.block_out_channels)
    k = config.cross_attention_levels
    down = ("DownBlock2D",) * (n - k) + ("CrossAttnDownBlock2D",) * k
    up = ("CrossAttnUpBlock2D",) * k + ("UpBlock2D",) * (n - k)
    return UNet2DConditionModel(
        sample_size=world.IMAGE_SIZE,
        in_channels=3,
        out_channels=3,
        block_out_channels=tuple(config.block_out_channels),
        layers_per_block=config.layers_per_block,
        down_block_types=down,
        up_block_types=up,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=config.text_hidden_size,
        # diffusers reads attention_head_dim as the number of heads here (a legacy name)
        attention_head_dim=config.attention_heads,
        norm_num_groups=min(32, min(config.block_out_channels)),
    )


def build_scheduler(config):
    """Linear betas 1e-4..0.02 over 1,000 steps, v-prediction, ``clip_sample`` (as the embedded DDPM)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=config.num_train_timesteps,
        beta_schedule="linear",
        beta_start=1e-4,
        beta_end=0.02,
        clip_sample=True,
        prediction_type="v_prediction",
    )


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
