"""The CLIP labeller against a tiny random CLIP saved to a local folder.

Loading by path runs the same ``from_pretrained`` code as a hub id, offline and in
milliseconds. The model's weights are random, so the tests check the arithmetic (pairing,
softmax, preprocessing, use of the model), not what CLIP knows.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hmine.clip_labeller import CLIP_MEAN, CLIP_STD, ClipLabeller, resize_and_crop

torch.set_num_threads(1)

# "smiling" and "hat" share their negative prompt, so the labeller encodes it once; the
# prompts differ in length, so the tokenizer pads and the attention mask matters.
PROMPTS = {
    "smiling": ("a photo of a smiling person", "a photo of a person"),
    "hat": ("a person wearing a hat", "a photo of a person"),
    "old": ("an old face", "a young face"),
}
TEXT_MAX_TOKENS = 64
IMAGE_SIZE = 32


def _write_tiny_tokenizer(folder) -> int:
    """A character-level CLIP BPE tokenizer (vocab.json + merges.txt, no merges); returns its vocab size.

    Byte-level BPE maps printable ASCII to itself, so every character is a token, with a
    ``</w>`` variant for the last character of a word.
    """
    from transformers import CLIPTokenizer

    symbols = [chr(code) for code in range(33, 127)]
    tokens = ["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    # from_pretrained, not CLIPTokenizer(vocab_file=...): transformers 5 ignores those
    # arguments and builds an empty vocabulary in which every character is unknown.
    CLIPTokenizer.from_pretrained(folder).save_pretrained(folder)
    return len(tokens)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    vocab_size = _write_tiny_tokenizer(folder)
    layers = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2)
    config = CLIPConfig(
        # bos/eos ids match the tokenizer, so the text tower pools at <|endoftext|>.
        text_config=dict(vocab_size=vocab_size, max_position_embeddings=TEXT_MAX_TOKENS,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1, **layers),
        vision_config=dict(image_size=IMAGE_SIZE, patch_size=8, **layers),
        projection_dim=16,
    )
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def labeller(tiny_clip_dir):
    return ClipLabeller(PROMPTS, model_id=str(tiny_clip_dir), batch_size=3)


def _images(seed: int, n: int, height: int = IMAGE_SIZE, width: int = IMAGE_SIZE) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, size=(n, 3, height, width)).astype(np.float32)


def test_scores_are_one_probability_column_per_attribute(labeller):
    images = _images(0, 7)  # 7 images in batches of 3: a short last batch
    scores = labeller.score(images)
    assert labeller.name == "clip" and labeller.attributes == ("smiling", "hat", "old")
    assert list(scores.columns) == list(PROMPTS) and scores.shape == (7, 3)
    assert (scores.dtypes == np.float64).all()
    assert ((scores > 0) & (scores < 1)).all().all()
    assert scores.to_numpy().std(axis=0).min() > 0  # images do get different scores
    np.testing.assert_array_equal(scores.to_numpy(), labeller.score(images).to_numpy())
    # a torch tensor, and images one at a time, give the same rows in the same order
    np.testing.assert_allclose(labeller.score(torch.from_numpy(images)).to_numpy(), scores.to_numpy(), atol=1e-6)
    one_by_one = np.concatenate([labeller.score(images[i : i + 1]).to_numpy() for i in range(7)])
    np.testing.assert_allclose(one_by_one, scores.to_numpy(), atol=1e-6)
    assert labeller.score(images[:0]).shape == (0, 3)


def test_swapping_a_prompt_pair_gives_one_minus_the_score(labeller, tiny_clip_dir):
    images = _images(1, 4)
    swapped = ClipLabeller({name: (neg, pos) for name, (pos, neg) in PROMPTS.items()}, model_id=str(tiny_clip_dir))
    np.testing.assert_allclose(swapped.score(images).to_numpy(), 1 - labeller.score(images).to_numpy(), atol=1e-6)


def test_an_attribute_scores_the_same_alone_or_with_others(labeller, tiny_clip_dir):
    images = _images(2, 4)
    alone = ClipLabeller({"hat": PROMPTS["hat"]}, model_id=str(tiny_clip_dir))
    np.testing.assert_allclose(alone.score(images)["hat"], labeller.score(images)["hat"], atol=1e-6)


def test_preprocessing_of_a_constant_image(labeller):
    pixels = labeller.preprocess(np.zeros((2, 3, 48, 64), dtype=np.float32))  # mid grey: 0.5 in [0, 1]
    assert pixels.shape == (2, 3, IMAGE_SIZE, IMAGE_SIZE) and pixels.dtype == torch.float32
    expected = (0.5 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels.numpy(), np.broadcast_to(expected[None, :, None, None], pixels.shape), atol=1e-5)
    # values outside [-1, 1] are clipped, as saving them as an image would
    white = labeller.preprocess(np.full((1, 3, 32, 32), 3.0, dtype=np.float32))
    np.testing.assert_allclose(white[0, :, 0, 0].numpy(), (1 - np.array(CLIP_MEAN)) / np.array(CLIP_STD), atol=1e-5)


def test_resize_follows_clips_image_processor_sizes():
    ramp = torch.arange(45 * 64, dtype=torch.float32).view(1, 1, 45, 64)
    # shorter side 45 -> 32, longer side int(32 * 64 / 45) = int(45.5) = 45, crop starts at (45 - 32) // 2 = 6
    expected = torch.nn.functional.interpolate(ramp, size=(32, 45), mode="bicubic", antialias=True)[..., 6:38]
    torch.testing.assert_close(resize_and_crop(ramp, 32), expected)
    tall = torch.rand(1, 3, 64, 40)
    assert resize_and_crop(tall, 32).shape == (1, 3, 32, 32)
    square = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(resize_and_crop(square, 32), square)


@pytest.mark.parametrize("height, width", [(40, 48), (45, 64), (64, 32)])
def test_preprocessing_matches_transformers_clip_image_processor(labeller, height, width):
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    # a smooth 8-bit image, so both pipelines see the same pixels; PIL rounds after
    # resizing, so agreement is to about one grey level
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    channels = [np.sin(3 * xs + 2 * ys), np.cos(5 * ys), xs * ys]
    image_8bit = np.round(np.stack(channels, axis=-1) * 100 + 127).clip(0, 255).astype(np.uint8)
    processor = CLIPImageProcessorPil(
        size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    )
    reference = processor(images=[image_8bit], return_tensors="pt")["pixel_values"]
    ours = labeller.preprocess(image_8bit.transpose(2, 0, 1)[None].astype(np.float32) / 127.5 - 1)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=2.5 / 255 / min(CLIP_STD))


def test_scores_equal_clip_model_logits_per_image(labeller, tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    images = _images(3, 3, height=40, width=48)
    pixels = labeller.preprocess(images)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_clip_dir)
    scores = labeller.score(images)
    for attribute, pair in PROMPTS.items():
        tokens = tokenizer(list(pair), padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**tokens, pixel_values=pixels).logits_per_image  # (images, [positive, negative])
        np.testing.assert_allclose(scores[attribute], logits.softmax(dim=-1)[:, 0].numpy(), atol=1e-5)


@pytest.mark.parametrize(
    "prompts, message",
    [
        ({}, "empty"),
        ({"smiling": ("a smile", "")}, "'smiling'.*non-empty"),
        ({"smiling": ("a smile", None)}, "'smiling'.*non-empty"),
        ({"hat": "a hat"}, "'hat'.*pair"),
        ({"hat": ("a hat", "no hat", "a cap")}, "'hat'.*pair"),
        ({"hat": ("a hat", "a hat")}, "'hat'.*same"),
        ({"": ("a hat", "no hat")}, "attribute names"),
    ],
)
def test_bad_prompts_are_named(tmp_path, prompts, message):
    with pytest.raises(ValueError, match=message):
        ClipLabeller(prompts, model_id=str(tmp_path))


def test_missing_or_broken_model_folders_are_named(tiny_clip_dir, tmp_path):
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError, match="missing does not exist"):
        ClipLabeller(PROMPTS, model_id=str(missing))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipLabeller(PROMPTS, model_id=str(tmp_path))

    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_clip_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt could not be loaded.*save_pretrained"):
        ClipLabeller(PROMPTS, model_id=str(corrupt))

    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_clip_dir / name, no_tokenizer / name)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        ClipLabeller(PROMPTS, model_id=str(no_tokenizer))


def test_bad_arguments_are_named(tiny_clip_dir, labeller):
    with pytest.raises(ValueError, match="batch_size"):
        ClipLabeller(PROMPTS, model_id=str(tiny_clip_dir), batch_size=0)
    with pytest.raises(ValueError, match=f"longer than the text tower's {TEXT_MAX_TOKENS} tokens"):
        ClipLabeller({"long": ("x" * TEXT_MAX_TOKENS, "y")}, model_id=str(tiny_clip_dir))
    with pytest.raises(ValueError, match="does not know some characters.*'a café'"):
        ClipLabeller({"cafe": ("a café", "a bar")}, model_id=str(tiny_clip_dir))  # é is outside the tiny vocab
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        labeller.score(np.zeros((2, 1, 32, 32), dtype=np.float32))
