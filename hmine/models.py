"""Loading pretrained diffusion models: a pixel or latent U-Net, unconditional or text-conditional.

The same code path serves a Hugging Face hub id (``google/ddpm-ema-celebahq-256``,
``CompVis/ldm-celebahq-256``) and a local folder in diffusers layout, so offline tests
that save tiny models with ``save_pretrained`` exercise exactly what hub users run.

Layouts understood:

* **pixel, flat** (``google/ddpm-ema-celebahq-256``): ``config.json`` + weights and
  ``scheduler_config.json`` at the root;
* **pipeline folders** (``CompVis/ldm-celebahq-256``, the embedded model): ``unet/``,
  ``scheduler/`` and, for a latent model, ``vqvae/``;
* **Stable Diffusion folders** (``stable-diffusion-v1-5/stable-diffusion-v1-5``, the
  embedded text world model): ``unet/`` (a ``UNet2DConditionModel``), ``text_encoder/``,
  ``tokenizer/``, ``scheduler/`` and, for a latent model, ``vae/`` (an ``AutoencoderKL``);
  the text parts are :mod:`hmine.text_models`'.

Weights are read from safetensors only: every part loads with ``use_safetensors=True``
(``diffusion_pytorch_model.safetensors`` or its sharded index), and a local folder is
checked first (:func:`check_model_source`), so a pickle ``.bin`` is never unpickled.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Literal

import torch

# re-exported: hmine.clip.loading and hmine.text_models check their weights with these
from hmine.safe_weights import (  # noqa: F401
    _SAFE_FIX,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
    _one_line,
    check_safetensors_weights,
)

EMBEDDED_MODEL_ID = "embedded:shapes-ddpm"
EMBEDDED_TEXT_MODEL_ID = "embedded:shapes-text-ddpm"
#: model ids of the models shipped inside the package -> their folder in hmine/embedded/
EMBEDDED_MODELS = {EMBEDDED_MODEL_ID: "shapes-ddpm", EMBEDDED_TEXT_MODEL_ID: "shapes-text-ddpm"}
_EMBEDDED_TRAINING = {
    EMBEDDED_MODEL_ID: "hmine train-embedded ddpm configs/embedded-ddpm.yaml",
    EMBEDDED_TEXT_MODEL_ID: "python -m hmine.textworld.train configs/embedded-text-ddpm.yaml --export-dir DIR",
}


def embedded_model_path(model_id: str = EMBEDDED_MODEL_ID) -> Path:
    """Folder of an embedded model (the shapes-world DDPM by default) inside the package."""
    return Path(str(resources.files("hmine") / "embedded" / EMBEDDED_MODELS[model_id]))


def model_folder(model_id: str) -> Path:
    """The folder of a local or embedded model id."""
    return embedded_model_path(model_id) if model_id in EMBEDDED_MODELS else Path(model_id)


@dataclass
class DiffusionModel:
    """A loaded diffusion model.

    Attributes
    ----------
    unet : diffusers.UNet2DModel or diffusers.UNet2DConditionModel
    scheduler : diffusers scheduler, as saved with the model (the sampler converts it)
    vqvae : diffusers.VQModel or None
        The decoder of a latent (LDM) model; None otherwise.
    model_id : str
        What was asked for: a hub id, a local path or ``embedded:shapes-ddpm``.
    revision : str
        Hub revision, or ``"local"`` for a folder.
    vae : diffusers.AutoencoderKL or None
        The autoencoder of a latent Stable Diffusion model; None otherwise.
    text_encoder, tokenizer : transformers models, or None
        The text side of a text-conditional model (:mod:`hmine.text_models`).
    """

    unet: object
    scheduler: object
    vqvae: object | None
    model_id: str
    revision: str
    vae: object | None = None
    text_encoder: object | None = None
    tokenizer: object | None = None

    @property
    def kind(self) -> Literal["pixel", "latent"]:
        return "pixel" if self.autoencoder is None else "latent"

    @property
    def autoencoder(self):
        """The latent model's decoder (a ``VQModel`` or an ``AutoencoderKL``), or None."""
        return self.vqvae if self.vqvae is not None else self.vae

    @property
    def text_conditional(self) -> bool:
        return self.text_encoder is not None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(color, height, width) of the decoded images."""
        _, *size = self.sample_shape
        if self.autoencoder is not None:
            size = [s * 2 ** (len(self.autoencoder.config.block_out_channels) - 1) for s in size]
        return (3, *size)

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """(channel, height, width) of x_t, the space the sampler runs in."""
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, *size)

    @torch.no_grad()
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from the sampler's final x_0 (identity for a pixel model).

        For a latent model this is what diffusers' ``LDMPipeline`` and
        ``StableDiffusionPipeline`` do: the U-Net works on latents scaled by the
        autoencoder's ``config.scaling_factor``, so x_0 is divided by it (and shifted by a
        ``shift_factor`` where the config has one) before ``decode``, and the decoded images
        are clamped to [-1, 1] (the pipelines' ``(image / 2 + 0.5).clamp(0, 1)``).
        """
        return self.decode_with_grad(x0)

    def decode_with_grad(self, x0: torch.Tensor) -> torch.Tensor:
        """:meth:`decode` with gradients in ``x0`` (a loss on the decoded images, :mod:`hmine.learning.train`)."""
        decoder = self.autoencoder
        if decoder is None:
            return x0
        latents = x0 / float(decoder.config.scaling_factor)
        if decoder.config.get("shift_factor") is not None:
            latents = latents + float(decoder.config.shift_factor)
        return decoder.decode(latents).sample.clamp(-1.0, 1.0)

    def to(self, device: str | torch.device) -> "DiffusionModel":
        for part in (self.unet, self.vqvae, self.vae, self.text_encoder):
            if part is not None:
                part.to(device)
        return self


def _local_layout(path: Path) -> str:
    if (path / "unet" / "config.json").exists():
        return "folders"
    if (path / "config.json").exists():
        return "flat"
    raise FileNotFoundError(
        f"model folder {path} has neither unet/config.json nor config.json; "
        "point model.id at a folder saved with save_pretrained (diffusers layout)"
    )


def _hub_layout(model_id: str, revision: str | None) -> str:
    import os

    from huggingface_hub import hf_hub_download

    try:
        index = json.loads(Path(hf_hub_download(model_id, "model_index.json", revision=revision)).read_text())
    except Exception as error:  # huggingface_hub's errors (offline, not found, HTTP) have no common base
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        reason = "the hub is switched off (HF_HUB_OFFLINE=1) and it is not in the local cache" if offline else (
            f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else 'no details'}"
        )
        raise FileNotFoundError(
            f"model.id {model_id!r} (revision {revision or 'main'}) cannot be fetched: {reason}; download it "
            "once on a machine with a network, or point model.id at a local folder saved with save_pretrained"
        ) from None
    try:
        hf_hub_download(model_id, "unet/config.json", revision=revision)
        return "folders"
    except Exception:  # the flat layout keeps the U-Net config at the root
        if "unet" not in index:
            raise ValueError(f"{model_id} has no U-Net in its model_index.json")
        return "flat"


def _check_part(model_id: str, folder: Path) -> dict:
    """Check one model part folder (``unet/``, ``vqvae/`` or a flat model); its config.

    Its weights are what diffusers loads with ``use_safetensors=True``
    (:func:`check_safetensors_weights` with :data:`WEIGHTS_NAME`).
    """
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"model.id {model_id!r}: cannot read {folder / 'config.json'} ({_one_line(error)}); "
            "the folder is corrupt or incomplete - re-save the model with save_pretrained"
        ) from error
    check_safetensors_weights(folder, WEIGHTS_NAME, f"model.id {model_id!r}", _SAFE_FIX)
    return config


def check_model_source(model_id: str) -> dict | None:
    """Check a local or embedded model folder without loading its weights; its U-Net config.

    Reads the U-Net, scheduler and (for a latent model) VQ autoencoder configs, and checks
    that each weighted part holds the weights diffusers loads with ``use_safetensors=True``
    (``diffusion_pytorch_model.safetensors``, or the shards its
    ``diffusion_pytorch_model.safetensors.index.json`` names) with headers safetensors can
    read (it checks them against the file's length). A folder with only pickle weights, or
    with an unrelated ``*.safetensors``, is refused before anything is unpickled or a run
    writes anything. Returns None for a hub id: those are checked when they are downloaded
    or found in the cache (and loaded with ``use_safetensors=True``).

    Raises
    ------
    FileNotFoundError, ValueError
        One line that names ``model.id``, the folder and the fix.
    """
    if model_id in EMBEDDED_MODELS:
        source = embedded_model_path(model_id)
    else:
        source = Path(model_id)
        if not source.exists():
            if model_id.startswith((".", "/")) or model_id.count("/") != 1:
                raise FileNotFoundError(
                    f"model.id {model_id!r} is neither an existing folder nor a hub id (owner/name); "
                    "fix the path or use a hub id such as google/ddpm-ema-celebahq-256"
                )
            return None
    layout = _local_layout(source)
    unet_dir = source / "unet" if layout == "folders" else source
    scheduler_config = (source / "scheduler" if layout == "folders" else source) / "scheduler_config.json"
    try:
        json.loads(scheduler_config.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"model.id {model_id!r}: cannot read {scheduler_config} ({_one_line(error)}); "
            "the folder is corrupt or incomplete - re-save the model with save_pretrained"
        ) from error
    unet_config = _check_part(model_id, unet_dir)
    for autoencoder in ("vqvae", "vae"):
        if (source / autoencoder).is_dir():
            _check_part(model_id, source / autoencoder)
    from hmine.text_models import check_text_parts

    check_text_parts(model_id, source, unet_config)
    return unet_config


def image_size_of(model_id: str) -> tuple[int, int] | None:
    """(height, width) of a local or embedded pixel model's images, read from its U-Net
    config without loading weights; None for a hub id or a latent model (known only once
    loaded: its decoder sets the size)."""
    unet_config = check_model_source(model_id)
    if unet_config is None or not unet_config.get("sample_size"):
        return None
    folder = model_folder(model_id)
    if (folder / "vqvae").exists() or (folder / "vae").exists():
        return None
    size = unet_config["sample_size"]
    return (size, size) if isinstance(size, int) else tuple(size)


def load_model(
    model_id: str = EMBEDDED_MODEL_ID,
    *,
    revision: str | None = None,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> DiffusionModel:
    """Load a pixel or latent, unconditional or text-conditional model from the hub, a folder or the package.

    Parameters
    ----------
    model_id : str, default="embedded:shapes-ddpm"
        A hub id such as ``google/ddpm-ema-celebahq-256`` or
        ``stable-diffusion-v1-5/stable-diffusion-v1-5``, a local folder in diffusers layout
        (module docstring), or ``embedded:shapes-ddpm`` for the model shipped with hmine.
    revision : str, optional
        Hub revision (branch, tag or commit); ignored for local folders.
    device : str, default="cpu"
    dtype : torch.dtype, default=torch.float32

    Returns
    -------
    DiffusionModel

    Raises
    ------
    FileNotFoundError, ValueError
        One line naming ``model.id`` and the fix: a missing or corrupt folder, a folder (or a
        hub revision) without safetensors weights.
    """
    import diffusers
    from diffusers import AutoencoderKL, VQModel
    from diffusers.schedulers import DDIMScheduler

    from hmine.text_models import is_conditional_unet, load_text_parts

    source, local = _model_source(model_id)
    if local:
        # Refuse pickle-only or corrupt folders in one line before diffusers opens anything.
        check_model_source(model_id)
    layout = _local_layout(Path(source)) if local else _hub_layout(model_id, revision)
    # use_safetensors=True: diffusers never falls back to unpickling diffusion_pytorch_model.bin.
    kwargs = {"use_safetensors": True} if local else {"use_safetensors": True, "revision": revision}
    unet_sub = "unet" if layout == "folders" else None
    sched_sub = "scheduler" if layout == "folders" else None
    hub = {} if local else {"revision": revision}
    conditional = is_conditional_unet(_unet_config(source, unet_sub, hub))
    unet_class = diffusers.UNet2DConditionModel if conditional else diffusers.UNet2DModel
    unet = _load_part(unet_class, model_id, revision, local, source, unet_sub, dtype, kwargs)
    scheduler_config = DDIMScheduler.load_config(source, subfolder=sched_sub, **hub)
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), DDIMScheduler)
    scheduler = scheduler_class.from_config(scheduler_config)
    parts = {}
    for name, part_class in (("vqvae", VQModel), ("vae", AutoencoderKL)):
        if (Path(source) / name).is_dir() if local else (
            layout == "folders" and _hub_has(model_id, f"{name}/config.json", revision)
        ):
            parts[name] = _load_part(part_class, model_id, revision, local, source, name, dtype, kwargs)
            parts[name].eval().requires_grad_(False).to(device)
    if conditional:
        encoder, parts["tokenizer"] = load_text_parts(model_id, source, revision=revision, local=local, dtype=dtype)
        parts["text_encoder"] = encoder.to(device)
    unet.eval().requires_grad_(False).to(device)
    return DiffusionModel(
        unet=unet,
        scheduler=scheduler,
        vqvae=parts.pop("vqvae", None),
        model_id=model_id,
        revision="local" if local else (revision or "main"),
        **parts,
    )


def _unet_config(source, subfolder: str | None, hub: dict) -> dict:
    """The U-Net's config.json (from the hub with ``hub``'s revision), which says its class."""
    from diffusers import UNet2DModel

    return UNet2DModel.load_config(source, subfolder=subfolder, **hub)


def _model_source(model_id: str) -> tuple[str | Path, bool]:
    """Where a model is read from and whether that is a local folder (one-line errors otherwise)."""
    if model_id in EMBEDDED_MODELS:
        source = embedded_model_path(model_id)
        if not (source / "unet" / "config.json").exists():
            raise FileNotFoundError(
                f"the embedded model {model_id} is missing from {source}; reinstall hmine or train it "
                f"with `{_EMBEDDED_TRAINING[model_id]}`"
            )
        return source, True
    if Path(model_id).exists():
        return model_id, True
    if model_id.startswith((".", "/")) or model_id.count("/") != 1:
        raise FileNotFoundError(
            f"model.id {model_id!r} is neither an existing folder nor a hub id (owner/name); "
            "fix the path or use a hub id such as google/ddpm-ema-celebahq-256"
        )
    return model_id, False


def _load_part(model_class, model_id, revision, local, source, subfolder, dtype, kwargs):
    """``model_class.from_pretrained`` (safetensors only), its failures as one line naming model.id and the fix."""
    part = "U-Net" if subfolder in (None, "unet") else f"{model_class.__name__} in {subfolder}/"
    try:
        return model_class.from_pretrained(
            source, subfolder=subfolder, low_cpu_mem_usage=False, torch_dtype=dtype, **kwargs
        )
    except (OSError, ValueError, json.JSONDecodeError) as error:
        if local:
            fix = f"the folder is corrupt or not a diffusers {model_class.__name__} - re-save it with save_pretrained"
        else:
            fix = (
                f"hmine loads safetensors weights only: use a revision of {model_id} that has "
                f"{WEIGHTS_NAME} (model.revision), or save the model locally with "
                "save_pretrained(safe_serialization=True) and set model.id to that folder"
            )
        raise ValueError(
            f"model.id {model_id!r} (revision {'local' if local else revision or 'main'}): could not load "
            f"the {part} ({_one_line(error)}); {fix}"
        ) from error


def _hub_has(model_id: str, filename: str, revision: str | None) -> bool:
    from huggingface_hub import hf_hub_download

    try:
        hf_hub_download(model_id, filename, revision=revision)
        return True
    except Exception:
        return False


# --------------------------------------------------------------------------------------
# Provenance: which exact weights, on which device
# --------------------------------------------------------------------------------------

_COMMIT = "0123456789abcdef"


def is_commit_hash(revision: str | None) -> bool:
    """A full 40-hex-digit git commit hash (what a hub revision resolves to)."""
    return revision is not None and len(revision) == 40 and all(c in _COMMIT for c in revision)


def is_hub_id(model_id: str) -> bool:
    """``owner/name`` that is neither the embedded model nor an existing local folder."""
    return model_id not in EMBEDDED_MODELS and not Path(model_id).exists() and model_id.count("/") == 1


def resolve_hub_revision(model_id: str, revision: str | None = None) -> str:
    """The commit hash a hub model's revision (branch, tag; default ``main``) points to now.

    Asks the hub unless ``HF_HUB_OFFLINE`` is set, then falls back to the local cache's
    ``refs/<revision>`` (written when the model was downloaded). A commit hash is returned
    as it is.

    Raises
    ------
    FileNotFoundError
        One line naming the model, the revision and the fix, when neither knows it.
    """
    import os

    wanted = revision or "main"
    if is_commit_hash(wanted):
        return wanted
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
    reason = "the hub is switched off (HF_HUB_OFFLINE=1)"
    if not offline:
        try:
            from huggingface_hub import HfApi

            return HfApi().model_info(model_id, revision=wanted).sha
        except Exception as error:  # huggingface_hub's errors have no common base
            reason = f"{type(error).__name__}: {_one_line(error)[:200]}"
    from huggingface_hub import constants

    ref = Path(constants.HF_HUB_CACHE) / f"models--{model_id.replace('/', '--')}" / "refs" / wanted
    if ref.is_file() and is_commit_hash(ref.read_text().strip()):
        return ref.read_text().strip()
    raise FileNotFoundError(
        f"model {model_id!r} (revision {wanted}) cannot be resolved to a commit: {reason} and the local cache "
        f"has no {ref}; run once with a network, or set the revision to a commit hash"
    )


def device_identity(device: str) -> str:
    """What a device computes as: ``cpu``, or the accelerator's type and model name
    (``cuda:NVIDIA H200``); two devices with one identity give the same bits."""
    kind = torch.device(device).type
    if kind == "cuda" and torch.cuda.is_available():
        index = torch.device(device).index
        return f"cuda:{torch.cuda.get_device_name(index if index is not None else torch.cuda.current_device())}"
    return kind


def resolve_device(device: str | torch.device | None, option: str = "device") -> torch.device:
    """The device a training or evaluation tool runs on: ``device``, or without one CUDA where
    available and else the CPU (the pipeline's stages take ``model.device`` as configured).

    A device this machine lacks (``cuda`` without a visible GPU, ``cuda:2`` with two GPUs)
    or a name torch does not know is refused in one line naming ``option``.
    """
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"{option} {device!r} is not a torch device; use cpu, cuda, cuda:N or mps") from None
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            why = "built without CUDA" if torch.version.cuda is None else "no GPU visible"
            raise ValueError(f"{option} {device}: CUDA is not available here (torch {torch.__version__}, {why}); use cpu")
        if chosen.index is not None and chosen.index >= torch.cuda.device_count():
            count = torch.cuda.device_count()
            raise ValueError(f"{option} {device}: this machine has {count} GPU(s); use cuda:0 to cuda:{count - 1}")
    elif chosen.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{option} {device}: MPS is not available here; use cpu")
    elif chosen.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{option} {device}: not a device hmine computes on; use cpu, cuda, cuda:N or mps")
    return chosen
