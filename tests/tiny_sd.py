"""A tiny random text-to-image model in the Stable Diffusion folder layout, for tests.

unet/ (a ``UNet2DConditionModel``), vae/ (``AutoencoderKL``), text_encoder/ (``CLIPTextModel``),
tokenizer/, scheduler/ (DDIM) and model_index.json, saved by ``StableDiffusionPipeline`` so that
diffusers' own pipelines (``StableDiffusionPipeline``, ``SemanticStableDiffusionPipeline``) load
the folder as the reference. ``conftest.py`` builds it once per session (``tiny_sd_dir``, ``tiny_sd``).
"""

from __future__ import annotations

import shutil

import torch

PROMPTS = ["a red circle", "a large blue square on a dark background", "a small green triangle at the top"]


def build_tiny_sd(path):
    """Save a tiny random model in the Stable Diffusion layout (StableDiffusionPipeline.save_pretrained)
    under ``path``/sd, its tokenizer the word-level one of the embedded text world; returns that folder."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from hmine.textworld.model import write_tokenizer

    write_tokenizer(path / "tokenizer-src", max_length=24)
    tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer-src")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=24, bos_token_id=0, eos_token_id=1, pad_token_id=1,
    ))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4,
        norm_num_groups=4, layers_per_block=1, scaling_factor=0.18215,
    )
    scheduler = DDIMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
        clip_sample=False, set_alpha_to_one=False, steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(path / "sd")
    shutil.rmtree(path / "tokenizer-src")
    return path / "sd"
