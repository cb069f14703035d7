"""The CLIP labeller against a tiny random CLIP saved locally (offline, same code path as the hub)."""

import numpy as np
import pytest
import torch

from hmine.clip_labeller import CLIP_MEAN, CLIP_STD, ClipLabeller

PROMPTS = {"smiling": ("a photo of a smiling person", "a photo of a person"), "hat": ("a person with a hat", "a person")}


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    path = tmp_path_factory.mktemp("tiny-clip")
    # a character-level vocabulary: printable ASCII maps to itself under byte-level BPE
    symbols = [chr(c) for c in range(33, 127)]
    vocab = {s: i for i, s in enumerate(["<|startoftext|>", "<|endoftext|>"] + symbols + [s + "</w>" for s in symbols])}
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(path)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16,
    )
    CLIPModel(config).save_pretrained(path)
    return path


def test_scores_are_pairwise_probabilities(tiny_clip_dir):
    labeller = ClipLabeller(PROMPTS, model_id=str(tiny_clip_dir), batch_size=3)
    images = np.random.default_rng(0).uniform(-1, 1, size=(5, 3, 32, 32)).astype(np.float32)
    scores = labeller.score(images)
    assert list(scores.columns) == ["smiling", "hat"] and scores.shape == (5, 2)
    assert ((scores > 0) & (scores < 1)).all().all()
    np.testing.assert_array_equal(scores.to_numpy(), labeller.score(images).to_numpy())
    swapped = ClipLabeller({k: (n, p) for k, (p, n) in PROMPTS.items()}, model_id=str(tiny_clip_dir))
    np.testing.assert_allclose(swapped.score(images).to_numpy(), 1 - scores.to_numpy(), atol=1e-6)


def test_scores_equal_the_model_logits(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    labeller = ClipLabeller(PROMPTS, model_id=str(tiny_clip_dir))
    images = np.random.default_rng(1).uniform(-1, 1, size=(2, 3, 40, 48)).astype(np.float32)
    pixels = labeller.preprocess(images)
    assert pixels.shape == (2, 3, 32, 32)
    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tokens = AutoTokenizer.from_pretrained(tiny_clip_dir)(list(PROMPTS["smiling"]), padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"], pixel_values=pixels).logits_per_image
    np.testing.assert_allclose(labeller.score(images)["smiling"], logits.softmax(-1)[:, 0].numpy(), atol=1e-5)


def test_preprocessing_of_a_constant_image(tiny_clip_dir):
    labeller = ClipLabeller(PROMPTS, model_id=str(tiny_clip_dir))
    pixels = labeller.preprocess(np.zeros((1, 3, 64, 64), dtype=np.float32))  # grey 0.5
    expected = (0.5 - np.array(CLIP_MEAN)) / np.array(CLIP_STD)
    np.testing.assert_allclose(pixels[0].mean(dim=(1, 2)).numpy(), expected, atol=1e-5)


def test_bad_prompts_and_missing_model_are_named(tmp_path):
    with pytest.raises(ValueError, match="empty"):
        ClipLabeller({}, model_id=str(tmp_path))
    with pytest.raises(ValueError, match="smiling"):
        ClipLabeller({"smiling": ("a smile", "")}, model_id=str(tmp_path))
    with pytest.raises(ValueError, match="hat"):
        ClipLabeller({"hat": "a hat"}, model_id=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        ClipLabeller(PROMPTS, model_id=str(tmp_path / "missing"))
