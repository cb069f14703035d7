"""Shared fixtures: tiny random-weight models saved to disk and loaded back by path.

No test may change what a module- or session-scoped fixture holds: the hooks of
:mod:`shared_fixtures` fail a test at teardown that did.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One private Prefect home (database, cached results) for the whole test session.
os.environ["HMINE_HOME"] = tempfile.mkdtemp(prefix="hmine-test-home-")

from hmine.runtime import configure_environment  # noqa: E402

configure_environment()
# The session's one Prefect server records task runs as a user's server does (hmine's own
# temporary server leaves that service off: nobody reads it), so tests can read them back.
os.environ["PREFECT_SERVER_SERVICES_TASK_RUN_RECORDER_ENABLED"] = "true"

import pytest  # noqa: E402  (after the environment: Prefect and torch read it at import)
import torch  # noqa: E402
from shared_fixtures import pytest_fixture_setup, pytest_runtest_teardown  # noqa: E402, F401  (no test changes a shared fixture)

torch.set_num_threads(1)


def make_tiny_unet(sample_size: int = 16, in_channels: int = 3, attention: bool = True):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        add_attention=attention,
    )


def make_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


@pytest.fixture(scope="session")
def tiny_pixel_model_dir(tmp_path_factory):
    """A tiny pixel model in the flat layout of google/ddpm-ema-celebahq-256."""
    path = tmp_path_factory.mktemp("tiny-pixel")
    make_tiny_unet().save_pretrained(path)
    make_scheduler().save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_latent_model_dir(tmp_path_factory):
    """A tiny latent model in the folder layout of CompVis/ldm-celebahq-256."""
    from diffusers import DDIMScheduler, VQModel

    path = tmp_path_factory.mktemp("tiny-latent")
    make_tiny_unet(sample_size=8, in_channels=3).save_pretrained(path / "unet")
    torch.manual_seed(1)
    VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=4,
        num_vq_embeddings=16,
        vq_embed_dim=3,
    ).save_pretrained(path / "vqvae")
    DDIMScheduler(num_train_timesteps=1000, clip_sample=False).save_pretrained(path / "scheduler")
    return path


@pytest.fixture(scope="session")
def tiny_scaled_latent_model_dir(tmp_path_factory):
    """A tiny latent model whose VQ autoencoder has ``scaling_factor=0.5``, saved by LDMPipeline.

    ``LDMPipeline.save_pretrained`` writes the CompVis/ldm-celebahq-256 layout (model_index.json,
    unet/, vqvae/, scheduler/), so diffusers' own pipeline can load the folder as the reference.
    """
    from diffusers import DDIMScheduler, LDMPipeline, VQModel

    path = tmp_path_factory.mktemp("tiny-latent-scaled")
    unet = make_tiny_unet(sample_size=8, in_channels=3)
    torch.manual_seed(2)
    vqvae = VQModel(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        layers_per_block=1,
        latent_channels=3,
        norm_num_groups=4,
        num_vq_embeddings=16,
        vq_embed_dim=3,
        scaling_factor=0.5,
    )
    # A codebook spread like the latents (the default init is +-1/16), so that x0 and
    # x0 / scaling_factor snap to different codes and a missing division shows.
    with torch.no_grad():
        vqvae.quantize.embedding.weight.normal_()
    scheduler = DDIMScheduler(num_train_timesteps=1000, clip_sample=False)
    LDMPipeline(vqvae=vqvae, unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


TINY_CLIP_IMAGE_SIZE = 32
TINY_CLIP_TEXT_TOKENS = 64


def _write_tiny_tokenizer(folder) -> int:
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt, no merges); returns its vocab size.

    Byte-level BPE maps printable ASCII to itself, so every character is a token, with a
    ``</w>`` variant for the last character of a word.
    """
    import json

    from transformers import CLIPTokenizer

    symbols = [chr(code) for code in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # from_pretrained, not CLIPTokenizer(vocab_file=...): transformers 5 ignores those
    # arguments and builds an empty vocabulary in which every character is unknown.
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    return len(tokens)


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIP (tokenizer and model) saved like a hub checkpoint, loaded by path."""
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab_size = _write_tiny_tokenizer(folder)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        # bos/eos ids match the tokenizer, so the text tower pools at <|endoftext|>.
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=TINY_CLIP_TEXT_TOKENS,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **layers),
        vision_config=dict(image_size=TINY_CLIP_IMAGE_SIZE, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random text-to-image model in the Stable Diffusion layout (tiny_sd.py), saved once."""
    from tiny_sd import build_tiny_sd

    return build_tiny_sd(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_dir):
    """``tiny_sd_dir`` loaded by hmine (hmine.models.load_model)."""
    from hmine.models import load_model

    return load_model(str(tiny_sd_dir))


@pytest.fixture(scope="session")
def prefect_api_url():
    """The API URL of the test session's one Prefect server, started on first use.

    Prefect keeps one temporary server per process (``SubprocessASGIServer`` is a
    singleton): in-process flows of the session use the same one, and ``hmine``
    processes reach it through ``PREFECT_API_URL``, as a user's own server.
    """
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if not server.running:
        server.start(timeout=120)
    return server.api_url
