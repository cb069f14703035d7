"""The text side of a Stable Diffusion layout: tokenizer and text encoder, checked, loaded, encoding prompts.

A text-conditional model folder (``stable-diffusion-v1-5/stable-diffusion-v1-5``, a
folder saved by ``StableDiffusionPipeline.save_pretrained``, the embedded text world
model) holds ``unet/`` (a ``UNet2DConditionModel``), ``text_encoder/`` (transformers,
``model.safetensors``), ``tokenizer/``, ``scheduler/`` and, for a latent model, ``vae/``.
The classes of the text parts come from ``model_index.json`` when it names them
(``["transformers", "CLIPTextModel"]``), else ``CLIPTextModel`` and ``CLIPTokenizer``.

Prompts are encoded as diffusers' ``StableDiffusionPipeline.encode_prompt`` does (padded
to the tokenizer's ``model_max_length``, the attention mask passed only when the text
encoder's config asks for it, the last hidden state), except that a prompt longer than
the tokenizer's limit is **refused**, not truncated with a warning: the prompt stored with
a sample is then exactly what the model saw.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_ENCODER_WEIGHTS = "model.safetensors"
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model", "spiece.model")


def _index(source: Path) -> dict:
    path = Path(source) / "model_index.json"
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError):
        return {}


def _class_name(index: dict, part: str, default: str) -> str:
    entry = index.get(part)
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == "transformers" and isinstance(entry[1], str):
        return entry[1]
    return default


def is_conditional_unet(unet_config: dict) -> bool:
    """Whether a U-Net config is a text-conditional ``UNet2DConditionModel``."""
    return unet_config.get("_class_name") == "UNet2DConditionModel"


def check_text_parts(model_id: str, source: Path, unet_config: dict) -> bool:
    """Check a local folder's text encoder and tokenizer without loading weights; whether it has them.

    Raises
    ------
    FileNotFoundError, ValueError
        One line naming ``model.id``, what is missing or corrupt, and the fix.
    """
    from hmine.safe_weights import _SAFE_FIX, check_safetensors_weights

    source = Path(source)
    has_encoder = (source / "text_encoder").is_dir()
    conditional = is_conditional_unet(unet_config)
    if conditional and not has_encoder:
        raise FileNotFoundError(
            f"model.id {model_id!r}: the U-Net is a UNet2DConditionModel but {source} has no text_encoder/ folder; "
            "save the whole pipeline (StableDiffusionPipeline.save_pretrained) into the folder"
        )
    if not has_encoder:
        return False
    if not conditional:
        raise ValueError(
            f"model.id {model_id!r}: {source} has a text_encoder/ but its U-Net is a "
            f"{unet_config.get('_class_name')}, which takes no text; remove text_encoder/ or fix unet/"
        )
    tokenizer = source / "tokenizer"
    if not tokenizer.is_dir():
        raise FileNotFoundError(
            f"model.id {model_id!r}: {source} has no tokenizer/ folder (a text-conditional model needs unet/, "
            "text_encoder/ and tokenizer/); copy the tokenizer folder of the pipeline it came from"
        )
    if not any((tokenizer / name).is_file() for name in _TOKENIZER_FILES):
        raise FileNotFoundError(
            f"model.id {model_id!r}: {tokenizer} holds none of {', '.join(_TOKENIZER_FILES)}; "
            "save the tokenizer with save_pretrained into it"
        )
    try:
        json.loads((source / "text_encoder" / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model.id {model_id!r}: cannot read {source / 'text_encoder' / 'config.json'} "
            f"({' '.join(str(error).split())}); re-save the text encoder with save_pretrained"
        ) from error
    check_safetensors_weights(source / "text_encoder", TEXT_ENCODER_WEIGHTS, f"model.id {model_id!r}", _SAFE_FIX)
    return True


def load_text_parts(model_id: str, source, *, revision: str | None, local: bool, dtype: torch.dtype):
    """The (text_encoder, tokenizer) of a pipeline folder or hub repository, safetensors only."""
    import transformers

    index = _index(Path(source)) if local else _hub_index(model_id, revision)
    encoder_class = getattr(transformers, _class_name(index, "text_encoder", "CLIPTextModel"))
    tokenizer_class = getattr(transformers, _class_name(index, "tokenizer", "CLIPTokenizer"))
    hub = {} if local else {"revision": revision}
    try:
        tokenizer = tokenizer_class.from_pretrained(source, subfolder="tokenizer", **hub)
    except (OSError, ValueError, TypeError) as error:
        raise FileNotFoundError(
            f"model.id {model_id!r}: could not load the tokenizer from tokenizer/ ({' '.join(str(error).split())[:300]}); "
            "a text-conditional model needs a tokenizer/ folder beside text_encoder/"
        ) from None
    try:
        encoder = encoder_class.from_pretrained(source, subfolder="text_encoder", use_safetensors=True, dtype=dtype, **hub)
    except (OSError, ValueError) as error:
        raise ValueError(
            f"model.id {model_id!r}: could not load the text encoder from text_encoder/ "
            f"({' '.join(str(error).split())[:300]}); hmine loads {TEXT_ENCODER_WEIGHTS} (safetensors) only"
        ) from None
    return encoder.eval().requires_grad_(False), tokenizer


def _hub_index(model_id: str, revision: str | None) -> dict:
    from huggingface_hub import hf_hub_download

    try:
        return json.loads(Path(hf_hub_download(model_id, "model_index.json", revision=revision)).read_text())
    except Exception:  # huggingface_hub's errors have no common base; the defaults then apply
        return {}


def token_count(tokenizer, prompt: str) -> int:
    """Tokens of ``prompt`` with the start and end tokens, untruncated."""
    return len(tokenizer(prompt, truncation=False, verbose=False).input_ids)  # verbose: our own error says it


def check_prompt_length(tokenizer, prompt: str, field: str) -> None:
    """Refuse a prompt longer than the tokenizer's ``model_max_length`` (one line naming ``field``)."""
    count, limit = token_count(tokenizer, prompt), tokenizer.model_max_length
    if count > limit:
        shown = prompt if len(prompt) <= 60 else prompt[:57] + "..."
        raise ValueError(
            f"{field}: the prompt {shown!r} is {count} tokens, over the tokenizer's limit of {limit} "
            "(start and end tokens included); shorten it: hmine refuses rather than truncates, so that the "
            "stored prompt is what the model saw"
        )


@torch.no_grad()
def encode_prompt(text_encoder, tokenizer, prompt: str, *, field: str = "prompt") -> torch.Tensor:
    """The text encoder's last hidden state (1, model_max_length, hidden) of one prompt.

    As ``StableDiffusionPipeline.encode_prompt`` (padding to ``model_max_length``, the
    attention mask only when ``text_encoder.config.use_attention_mask``), after
    :func:`check_prompt_length`.
    """
    check_prompt_length(tokenizer, prompt, field)
    tokens = tokenizer(
        [prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    device = next(text_encoder.parameters()).device
    mask = tokens.attention_mask.to(device) if getattr(text_encoder.config, "use_attention_mask", False) else None
    return text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]


def check_run_text(config) -> None:
    """Preflight of a run's text settings, loading no weights: the model and ``sample.text``
    agree (prompts for a text-conditional model, none for another) and every prompt of the
    run's seeds, the negative prompt and the directions' prompt pairs fit the tokenizer. A
    hub model is checked when loaded.
    """
    from hmine.models import check_model_source, model_folder

    unet_config = check_model_source(config.model.id)
    if unet_config is None:
        return
    text = config.sample.text
    if is_conditional_unet(unet_config) and text is None:
        raise ValueError(
            f"model.id {config.model.id!r} is text-conditional: give its prompts in sample.text "
            "(prompts: [...] or template: with slots:)"
        )
    if text is None:
        return
    if not is_conditional_unet(unet_config):
        raise ValueError(
            f"sample.text is set but model.id {config.model.id!r} is not text-conditional (no text_encoder/); "
            "remove sample.text or use a text-to-image model"
        )
    import transformers

    folder = model_folder(config.model.id)
    tokenizer_class = getattr(transformers, _class_name(_index(folder), "tokenizer", "CLIPTokenizer"))
    tokenizer = tokenizer_class.from_pretrained(folder, subfolder="tokenizer")
    field = "sample.text.prompts" if text.prompts is not None else "sample.text.template"
    seeds = config.sample.seeds[: text.n_prompts]  # the seeds cycle through the prompts
    for prompt in dict.fromkeys(text.prompt_for(seed) for seed in seeds):
        check_prompt_length(tokenizer, prompt, field)
    if text.negative_prompt is not None:
        check_prompt_length(tokenizer, text.negative_prompt, "sample.text.negative_prompt")
    pairs = config.directions.prompt_pairs
    for name, prompts in ({} if pairs is None else pairs.pairs).items():
        for prompt in prompts:
            check_prompt_length(tokenizer, prompt, f"directions.prompt_pairs.pairs.{name}")
