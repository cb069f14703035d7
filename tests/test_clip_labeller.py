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
from conftest import TINY_CLIP_IMAGE_SIZE, TINY_CLIP_TEXT_TOKENS

from hmine.clip import CLIP_MEAN, CLIP_STD, ClipLabeller, ImagePreprocessing

torch.set_num_threads(1)

# "smiling" and "hat" share their negative prompt, so the labeller encodes it once; the
# prompts differ in length, so the tokenizer pads and the attention mask matters.
PROMPTS = {
    "smiling": ("a photo of a smiling person", "a photo of a person"),
    "hat": ("a person wearing a hat", "a photo of a person"),
    "old": ("an old face", "a young face"),
}
IMAGE_SIZE = TINY_CLIP_IMAGE_SIZE


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
    resize_and_crop = ImagePreprocessing(shortest_edge=32, crop_height=32, crop_width=32, do_normalize=False)
    ramp = torch.linspace(0, 1, 45 * 64).view(1, 1, 45, 64)
    # shorter side 45 -> 32, longer side int(32 * 64 / 45) = int(45.5) = 45, crop starts at (45 - 32) // 2 = 6
    expected = torch.nn.functional.interpolate(ramp, size=(32, 45), mode="bicubic", antialias=True)[..., 6:38]
    torch.testing.assert_close(resize_and_crop(ramp), expected.clamp(0, 1))
    tall = torch.rand(1, 3, 64, 40)
    assert resize_and_crop.resized_size(64, 40) == (51, 32) and resize_and_crop(tall).shape == (1, 3, 32, 32)
    square = torch.rand(1, 3, 32, 32)
    torch.testing.assert_close(resize_and_crop(square), square)
    # no resize, crop larger than the image: zero padding, ceil((32 - 25) / 2) = 4 rows before, as transformers does
    pad_only = ImagePreprocessing(do_resize=False, crop_height=32, crop_width=32, do_normalize=False)
    padded = pad_only(torch.ones(1, 1, 25, 40))
    assert padded.shape == (1, 1, 32, 32)
    assert padded[0, 0, :, 0].tolist() == [0.0] * 4 + [1.0] * 25 + [0.0] * 3


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


def _with_processor(tiny_clip_dir, folder, **settings):
    """A copy of the tiny CLIP whose folder holds a preprocessor_config.json with ``settings``."""
    from transformers import CLIPImageProcessor

    shutil.copytree(tiny_clip_dir, folder)
    CLIPImageProcessor(**settings).save_pretrained(folder)
    return folder


def _smooth_images(seed: int, n: int, height: int, width: int) -> np.ndarray:
    """Smooth float32 images in [-1, 1] on 8-bit levels within [0.1, 0.9] of [0, 1].

    8-bit levels: the PIL-backed processor can be given them without its 8-bit conversion
    changing them. Inside (0, 1): bicubic overshoot never reaches the clip at 0 and 1.
    """
    rng = np.random.default_rng(seed)
    ys, xs = np.meshgrid(np.linspace(0, 1, height), np.linspace(0, 1, width), indexing="ij")
    images = []
    for _ in range(n):
        a, b, c = rng.uniform(1, 6, size=3)
        channels = [np.sin(a * xs + b * ys + c), np.cos(3 * b * xs * ys + a), np.sin(c * xs) * np.cos(a * ys)]
        images.append(np.round((np.stack(channels) * 0.4 + 0.5) * 255) / 255)
    return (np.stack(images) * 2 - 1).astype(np.float32)


def _pair_scores(folder, pixels: torch.Tensor) -> dict[str, np.ndarray]:
    """Each attribute's softmax over its prompt pair, from CLIPModel itself on ``pixels``."""
    from transformers import AutoTokenizer, CLIPModel

    model = CLIPModel.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    scores = {}
    for attribute, pair in PROMPTS.items():
        tokens = tokenizer(list(pair), padding=True, return_tensors="pt")
        with torch.no_grad():
            logits = model(**tokens, pixel_values=pixels).logits_per_image  # (images, [positive, negative])
        scores[attribute] = logits.softmax(dim=-1)[:, 0].numpy()
    return scores


@pytest.mark.parametrize(
    "settings",
    [
        # resize the shorter side to 40, then crop 32; mean = std = 0.5 (e.g. SigLIP-style checkpoints)
        dict(size={"shortest_edge": 40}, crop_size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3),
        # squash to 32x32 without a crop, bilinear, OpenAI mean/std
        dict(size={"height": 32, "width": 32}, do_center_crop=False, resample=2),
        # nearest, shortest edge 36, crop 32, other per-channel mean/std
        dict(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32}, resample=0,
             image_mean=[0.2, 0.4, 0.6], image_std=[0.3, 0.5, 0.7]),
    ],
    ids=["shortest40-crop32-half", "exact32-bilinear", "nearest-shortest36"],
)
def test_preprocessing_follows_the_checkpoints_image_processor(tiny_clip_dir, tmp_path, settings):
    from transformers import CLIPImageProcessor

    folder = _with_processor(tiny_clip_dir, tmp_path / "clip", **settings)
    processor = CLIPImageProcessor.from_pretrained(folder)
    labeller = ClipLabeller(PROMPTS, model_id=str(folder))
    images = _smooth_images(4, 4, height=45, width=60)
    # the processor's own preprocessing of the same float images in [0, 1] (no rescaling),
    # in float64 on the exact 8-bit levels, which its PIL backend turns into 8-bit pixels unchanged
    unit = list(np.round((images.astype(np.float64) + 1) / 2 * 255) / 255)
    reference = processor(images=unit, do_rescale=False, return_tensors="pt", input_data_format="channels_first")
    reference = reference["pixel_values"].float()

    ours = labeller.preprocess(images)
    assert ours.shape == reference.shape == (4, 3, IMAGE_SIZE, IMAGE_SIZE)
    # Without torchvision, transformers' CLIPImageProcessor is PIL-backed: it resizes in two
    # 8-bit passes, so it differs from float resizing by up to about one grey level (measured:
    # 1.02 bicubic, 0.98 bilinear, 0 nearest); tolerance 1.5 grey levels, in normalised units.
    np.testing.assert_allclose(ours.numpy(), reference.numpy(), atol=1.5 / 255 / min(processor.image_std))
    expected = _pair_scores(folder, reference)  # measured: within 6e-4 (1e-6 for nearest)
    scores = labeller.score(images)
    for attribute in PROMPTS:
        np.testing.assert_allclose(scores[attribute], expected[attribute], atol=1e-3)


def test_a_checkpoint_without_a_processor_config_gets_clips_defaults_and_a_log_line(labeller, tiny_clip_dir, caplog):
    import logging

    with caplog.at_level(logging.WARNING, logger="hmine.clip"):
        ClipLabeller({"hat": PROMPTS["hat"]}, model_id=str(tiny_clip_dir))
    assert f"label.clip_model_id {str(tiny_clip_dir)!r}" in caplog.text
    assert "no preprocessor_config.json" in caplog.text and "CLIP's defaults" in caplog.text
    defaults = labeller.preprocessing
    assert (defaults.shortest_edge, defaults.crop_height, defaults.crop_width) == (IMAGE_SIZE,) * 3
    assert (defaults.resample, defaults.image_mean, defaults.image_std) == ("bicubic", CLIP_MEAN, CLIP_STD)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(crop_size={"height": 24, "width": 24}, size={"shortest_edge": 24}), "into 24x24 pixel values.*takes 32x32.*crop_size"),
        (dict(resample=1, size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), "resample=1 is not nearest"),
        (dict(size={"shortest_edge": 32, "longest_edge": 64}), "size .* is neither shortest_edge alone"),
        (dict(rescale_factor=1 / 127.5), "rescale_factor=0.00784.* does not map 8-bit pixels"),
    ],
)
def test_processor_settings_torch_cannot_follow_are_named(tiny_clip_dir, tmp_path, settings, message):
    folder = _with_processor(tiny_clip_dir, tmp_path / "clip", **settings)
    with pytest.raises(ValueError, match=f"label.clip_model_id .*{message}"):
        ClipLabeller(PROMPTS, model_id=str(folder))


def test_an_unreadable_processor_config_or_a_non_square_output_is_named(tiny_clip_dir, tmp_path):
    folder = _with_processor(tiny_clip_dir, tmp_path / "clip", size={"shortest_edge": 32}, do_center_crop=False)
    labeller = ClipLabeller(PROMPTS, model_id=str(folder))
    assert labeller.score(_smooth_images(0, 1, 48, 48)).shape == (1, 3)
    with pytest.raises(ValueError, match="turns 40x48 images into 32x38 pixel values.*takes 32x32"):
        labeller.score(_smooth_images(0, 1, 40, 48))
    (folder / "preprocessor_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="label.clip_model_id .*preprocessor_config.json cannot be read.*delete it"):
        ClipLabeller(PROMPTS, model_id=str(folder))


def test_pickle_weights_beside_an_unrelated_safetensors_are_refused_unread(tiny_clip_dir, tmp_path, monkeypatch):
    import pickle

    from safetensors.torch import save_file
    from transformers import CLIPModel

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_clip_dir, folder)
    (folder / "model.safetensors").unlink()
    torch.save(CLIPModel.from_pretrained(tiny_clip_dir).state_dict(), folder / "pytorch_model.bin")
    save_file({"unrelated": torch.zeros(2)}, str(folder / "other.safetensors"))
    unpickled = []

    def refuse(*args, **kwargs):
        unpickled.append(args[:1])
        raise AssertionError("a pickle was opened")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with pytest.raises(FileNotFoundError, match=r"label.clip_model_id .*pickled has no model.safetensors.*"
                                                r"pytorch_model.bin.*save_pretrained\(safe_serialization=True\)"):
        ClipLabeller(PROMPTS, model_id=str(folder))
    # a config that points transformers at a pickle is refused too
    (folder / "model.safetensors").write_bytes((tiny_clip_dir / "model.safetensors").read_bytes())
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "transformers_weights": "adapter_model.bin"}))
    with pytest.raises(ValueError, match="transformers_weights='adapter_model.bin', not a safetensors file"):
        ClipLabeller(PROMPTS, model_id=str(folder))
    assert unpickled == []


def test_hub_ids_load_safetensors_and_fall_back_to_clips_defaults_with_a_log_line(tiny_clip_dir, monkeypatch, caplog):
    """A hub id passes use_safetensors=True and the revision; a repository without a processor config is logged."""
    import logging

    from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

    calls = []
    real_model, real_tokenizer = CLIPModel.from_pretrained.__func__, AutoTokenizer.from_pretrained.__func__

    def model_from_hub(cls, model_id, **kwargs):
        calls.append((model_id, kwargs))
        return real_model(cls, tiny_clip_dir)

    def no_processor_config(cls, model_id, **kwargs):
        raise OSError(f"{model_id} does not appear to have a file named preprocessor_config.json")

    monkeypatch.setattr(CLIPModel, "from_pretrained", classmethod(model_from_hub))
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(lambda cls, model_id, **k: real_tokenizer(cls, tiny_clip_dir)))
    monkeypatch.setattr(CLIPImageProcessor, "from_pretrained", classmethod(no_processor_config))
    with caplog.at_level(logging.WARNING, logger="hmine.clip"):
        labeller = ClipLabeller(PROMPTS, model_id="owner/clip", revision="v2")
    assert calls == [("owner/clip", {"revision": "v2", "use_safetensors": True})]
    assert "label.clip_model_id 'owner/clip': no preprocessor_config.json could be loaded" in caplog.text
    assert labeller.preprocessing == ImagePreprocessing.clip_defaults(IMAGE_SIZE)


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
    with pytest.raises(ValueError, match="label.clip_model_id .*corrupt/model.safetensors is not a readable safetensors"):
        ClipLabeller(PROMPTS, model_id=str(corrupt))
    (corrupt / "config.json").write_text("{not json")
    (corrupt / "model.safetensors").write_bytes((tiny_clip_dir / "model.safetensors").read_bytes())
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
    with pytest.raises(ValueError, match=f"longer than the text tower's {TINY_CLIP_TEXT_TOKENS} tokens"):
        ClipLabeller({"long": ("x" * TINY_CLIP_TEXT_TOKENS, "y")}, model_id=str(tiny_clip_dir))
    with pytest.raises(ValueError, match="does not know some characters.*'a café'"):
        ClipLabeller({"cafe": ("a café", "a bar")}, model_id=str(tiny_clip_dir))  # é is outside the tiny vocab
    with pytest.raises(ValueError, match=r"\(n, 3, H, W\)"):
        labeller.score(np.zeros((2, 1, 32, 32), dtype=np.float32))
