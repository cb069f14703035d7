"""Resumable training of the text-conditional shapes-world model (text encoder + U-Net, jointly).

    python -m hmine.textworld.train configs/embedded-text-ddpm.yaml --work-dir stores/train-text \
        [--until-step N] [--export-dir DIR] [--init-from DIR] [--device cuda]

Each step draws a fresh batch of world images (seeded by ``(seed, step)``), captions them
naming a random subset of their factors (:func:`hmine.textworld.captions.caption_batch`,
also seeded by the step; 10 % empty captions for classifier-free guidance), and trains the
text encoder and the U-Net together on the v-prediction loss.

The loop, its work directory (``config.json``, ``checkpoints/``, ``latest.json``,
``log.jsonl``, ``ema/``, ``grid-NNNNNN.png``: 8 prompts x 8 seeds, EMA weights, CFG) and
its checkpoints are those of :mod:`hmine.world.training`; this module adds the tokenizer
(``tokenizer/``), the model pair, its loss and its export.

``--init-from DIR`` (or ``init_from`` in the config) starts a new work dir from trained
weights instead of the seeded random ones: an exported model folder (``unet/`` +
``text_encoder/``, e.g. ``hmine/embedded/shapes-text-ddpm``) or another run's work dir (its
newest checkpoint's EMA). Both the weights and their EMA start there; the optimizer and the
step count start afresh, so the config's schedule (warm-up, cosine) is the fine-tune's. It is
part of the work dir's ``config.json``: resume with the same command (the checkpoint, not
``DIR``, is then what the run continues from).

SIGINT and SIGTERM end the run after the current step with a checkpoint (exit 130 / 143);
the same command resumes. The data, the captions and the noise of step ``s`` depend on
``(seed, s)`` only, so a resumed run computes what an uninterrupted one would have.

Devices
-------
``--device`` (``cpu``, ``cuda``, ``cuda:N``; by default CUDA where available, else the CPU)
is where the model, its EMA, the optimizer's state and every batch live. It is not part of
the config (nor of the work dir's ``config.json``), so a run may move between devices: the
initial weights are built on the CPU, the images, captions, noise and timesteps are drawn
by CPU generators and then moved, and checkpoints hold CPU tensors (safetensors) that load
onto whatever device the resumed run uses — a GPU run resumes on the CPU and vice versa.
Bit-identity: on the CPU a resumed run equals an uninterrupted one bit for bit (every
checkpoint tensor ``torch.equal`` on the tests' tiny config; the tests check it to 1e-5).
Across devices it does not: the batches are the same, but a GPU's kernels round
differently from the CPU's, so a run resumed on another device drifts from the
uninterrupted one by float rounding from the resume on. Resuming on the same GPU is not
measured; PyTorch's CUDA kernels are not all deterministic by default (some backward
passes add atomically), so expect agreement to rounding there, not bit-identity.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (stack-notes §0.2)
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pydantic import BaseModel, ConfigDict, Field, model_validator  # noqa: E402

from hmine import world  # noqa: E402
from hmine.models import resolve_device  # noqa: E402
from hmine.textworld import captions  # noqa: E402
from hmine.textworld import model as tw  # noqa: E402
from hmine.world.training import (  # noqa: E402
    Schedule,
    Trainee,
    TrainResult,
    check_work_dir_config,
    latest_checkpoint,
    train_loop,
    warmup_cosine,
)

logger = logging.getLogger(__name__)

GRID_PROMPTS = (
    "a red circle",
    "a green square",
    "a blue triangle",
    "a large shape",
    "a small shape",
    "a shape at the top left",
    "a shape at the bottom right",
    "a large blue square at the top right on a light background",
)
"""Rows of the sample grids written while training."""


class TextTrainConfig(BaseModel):
    """Settings of a text-conditional world model training run."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    steps: int = Field(6000, ge=1)
    batch_size: int = Field(48, ge=1)
    learning_rate: float = Field(6e-4, gt=0)
    warmup_steps: int = Field(200, ge=0)
    min_lr_fraction: float = Field(0.1, ge=0, le=1, description="the cosine decays to this fraction of the peak")
    weight_decay: float = Field(0.0, ge=0)
    ema_decay: float = Field(0.999, ge=0, lt=1)
    seed: int = Field(0, ge=0, le=999)
    # U-Net
    block_out_channels: tuple[int, ...] = (64, 128, 128)
    layers_per_block: int = Field(1, ge=1)
    cross_attention_levels: int = Field(1, ge=1, description="lowest-resolution levels with transformers (plus the mid block)")
    attention_heads: int = Field(4, ge=1, description="heads of every transformer (diffusers calls it attention_head_dim)")
    num_train_timesteps: int = Field(1000, ge=2)
    # text encoder (a CLIPTextModel, trained jointly)
    text_hidden_size: int = Field(128, ge=8)
    text_intermediate_size: int = Field(512, ge=8)
    text_layers: int = Field(2, ge=1)
    text_heads: int = Field(4, ge=1)
    max_tokens: int = Field(16, ge=15, description="tokenizer model_max_length (the longest caption is 14 tokens)")
    # captions
    name_probability: float = Field(0.5, ge=0, le=1, description="each factor is named with this probability")
    caption_drop_probability: float = Field(0.1, ge=0, le=1, description="share of empty captions (for CFG)")
    # bookkeeping
    checkpoint_every: int = Field(100, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    ema_snapshot_every: int = Field(1000, ge=0, description="also keep the EMA weights of every this many steps in ema/ (0: never)")
    sample_every: int = Field(500, ge=1)
    sample_steps: int = Field(20, ge=1)
    sample_guidance_scale: float = Field(4.0, ge=1)
    log_every: int = Field(20, ge=1)
    torch_threads: int = Field(1, ge=1)
    init_from: Path | None = Field(
        None,
        description=(
            "start a new work dir from these weights (fine-tuning): an exported model folder "
            "(unet/ + text_encoder/) or a training work dir (its newest checkpoint's EMA)"
        ),
    )

    @model_validator(mode="after")
    def _fits(self) -> "TextTrainConfig":
        if self.text_hidden_size % self.text_heads:
            raise ValueError("text_hidden_size must be a multiple of text_heads")
        if self.cross_attention_levels > len(self.block_out_channels):
            raise ValueError("cross_attention_levels must be <= len(block_out_channels)")
        for channels in self.block_out_channels:
            if channels % self.attention_heads:
                raise ValueError("every block_out_channels must be a multiple of attention_heads")
        return self

    def step_seed(self, step: int) -> int:
        """Seed of the world images, captions and noise of 0-based step ``step``."""
        return self.seed * 1_000_003 + step

    def learning_rate_at(self, step: int) -> float:
        """Linear warm-up, then cosine decay to ``min_lr_fraction`` of the peak at ``steps``."""
        return warmup_cosine(
            step, peak=self.learning_rate, warmup_steps=self.warmup_steps, steps=self.steps, floor=self.min_lr_fraction
        )


def load_config(path: Path) -> TextTrainConfig:
    """A :class:`TextTrainConfig` from a YAML file."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path} holds no mapping of settings")
    return TextTrainConfig(**data)


# -- the model pair ---------------------------------------------------------------------


class Parts(torch.nn.Module):
    """Text encoder and U-Net as one module, so one optimizer, one EMA, one state dict hold both."""

    def __init__(self, config: TextTrainConfig, vocab_size: int):
        super().__init__()
        self.text_encoder = tw.build_text_encoder(config, vocab_size)
        self.unet = tw.build_unet(config)

    def forward(self, input_ids: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        states = self.text_encoder(input_ids).last_hidden_state
        return self.unet(x_t, t, encoder_hidden_states=states).sample


def build_parts(config: TextTrainConfig, tokenizer) -> Parts:
    torch.manual_seed(config.seed)  # the initial weights are part of the seeded run
    return Parts(config, len(tokenizer))


def initial_weights(path: Path, tokenizer) -> dict[str, torch.Tensor]:
    """The :class:`Parts` state dict a fine-tune starts from (see ``init_from``).

    An exported folder's tokenizer must give the run's token ids (the words are the
    embedding rows); a work dir's newest checkpoint holds both parts' EMA already.
    """
    from safetensors.torch import load_file
    from transformers import CLIPTokenizer

    from hmine.world.training import checkpoint_weights

    path = Path(path)
    if (path / "config.json").is_file() and (path / "checkpoints").is_dir():
        weights = checkpoint_weights(path, "ema")
        if weights is None:
            raise FileNotFoundError(f"init_from {path}: the work dir has no checkpoint yet")
        folder = path / "tokenizer"
    else:
        files = {
            "unet": path / "unet" / "diffusion_pytorch_model.safetensors",
            "text_encoder": path / "text_encoder" / "model.safetensors",
        }
        missing = [str(f) for f in files.values() if not f.is_file()]
        if missing:
            raise FileNotFoundError(
                f"init_from {path} is neither an exported model folder nor a training work dir (missing {', '.join(missing)})"
            )
        weights = {f"{part}.{k}": v for part, file in files.items() for k, v in load_file(str(file)).items()}
        folder = path / "tokenizer"
    if folder.is_dir() and CLIPTokenizer.from_pretrained(folder).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"init_from {path}: its tokenizer's vocabulary differs from this run's; the word embeddings would not match"
        )
    return weights


def training_batch(config: TextTrainConfig, step: int) -> tuple[world.WorldBatch, list[str]]:
    """World images and captions of 0-based training step ``step``."""
    seed = config.step_seed(step)
    batch = world.generate(config.batch_size, seed=seed)
    texts, _ = captions.caption_batch(
        batch.factors, seed, name_probability=config.name_probability, drop_probability=config.caption_drop_probability
    )
    return batch, texts


def training_loss(parts: Parts, tokenizer, scheduler, config: TextTrainConfig, step: int) -> torch.Tensor:
    """The v-prediction MSE of step ``step`` (its images, captions, noise and timesteps).

    The batch is drawn on the CPU (the same on every device) and computed where ``parts`` is.
    """
    batch, texts = training_batch(config, step)
    x0 = torch.from_numpy(batch.images)
    gen = torch.Generator().manual_seed(config.step_seed(step))
    noise = torch.randn(x0.shape, generator=gen)
    t = torch.randint(0, config.num_train_timesteps, (config.batch_size,), generator=gen)
    a = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
    target = a.sqrt() * noise - (1 - a).sqrt() * x0  # v (Salimans & Ho 2022)
    device = next(parts.parameters()).device
    prediction = parts(tw.tokenize(tokenizer, texts).to(device), x_t.to(device), t.to(device))
    return F.mse_loss(prediction, target.to(device))


# -- work dir and export ---------------------------------------------------------------


def ensure_run_files(config: TextTrainConfig, work_dir: Path):
    """Write (or check) ``config.json`` and ``tokenizer/`` of a work dir; return the tokenizer."""
    from transformers import CLIPTokenizer

    check_work_dir_config(config, work_dir)
    folder = work_dir / "tokenizer"
    if not (folder / "tokenizer_config.json").is_file():
        tw.write_tokenizer(folder, config.max_tokens)
    return CLIPTokenizer.from_pretrained(folder)


def load_work_dir(work_dir: Path, which: str = "ema", step: int | None = None, device: str | torch.device = "cpu"):
    """The model of a work dir's newest checkpoint (``which``: ``ema`` or ``model`` weights).

    With ``step``, the EMA snapshot ``ema/ema-<step>.safetensors`` instead (or the
    checkpoint of that step, while it is kept). The weights are read on the CPU and the
    model moved to ``device``. Returns ``(TextWorldModel, step)``.
    """
    from safetensors.torch import load_file

    from hmine.textworld.sampling import TextWorldModel

    work_dir = Path(work_dir)
    config = TextTrainConfig.model_validate_json((work_dir / "config.json").read_text())
    tokenizer = ensure_run_files(config, work_dir)
    parts = build_parts(config, tokenizer)
    if step is not None:
        weights = work_dir / "checkpoints" / f"step-{step:06d}" / f"{which}.safetensors"
        if not weights.is_file() and which == "ema":
            weights = work_dir / "ema" / f"ema-{step:06d}.safetensors"
        if not weights.is_file():
            raise FileNotFoundError(f"{work_dir} keeps no {which} weights of step {step}")
    else:
        folder = latest_checkpoint(work_dir)
        if folder is None:
            raise FileNotFoundError(f"{work_dir} has no checkpoint yet")
        weights = folder / f"{which}.safetensors"
        step = json.loads((folder / "state.json").read_text())["step"]
    parts.load_state_dict(load_file(str(weights)))
    model = TextWorldModel(parts.unet, parts.text_encoder, tokenizer, tw.build_scheduler(config)).to(device).eval()
    return model, step


MODEL_INDEX = {
    "_class_name": "SemanticStableDiffusionPipeline",
    "unet": ["diffusers", "UNet2DConditionModel"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "scheduler": ["diffusers", "DDPMScheduler"],
    # Pixel space: no VAE. Stable Diffusion's other parts are absent as well.
    "vae": [None, None],
    "safety_checker": [None, None],
    "feature_extractor": [None, None],
    "requires_safety_checker": False,
}


def export_model(parts: Parts, tokenizer, config: TextTrainConfig, export_dir: Path) -> Path:
    """Write the Stable-Diffusion-like folder: unet/, text_encoder/, tokenizer/, scheduler/, model_index.json.

    Written from a CPU copy of ``parts`` (which stay where they are), like the checkpoints.
    """
    import diffusers

    if next(parts.parameters()).device.type != "cpu":
        parts = copy.deepcopy(parts).to("cpu")
    export_dir = Path(export_dir)
    export_dir.mkdir(parents=True, exist_ok=True)
    parts.unet.save_pretrained(export_dir / "unet", safe_serialization=True)
    parts.text_encoder.save_pretrained(export_dir / "text_encoder", safe_serialization=True)
    tokenizer.save_pretrained(export_dir / "tokenizer")
    tw.build_scheduler(config).save_pretrained(export_dir / "scheduler")
    index = {"_class_name": MODEL_INDEX["_class_name"], "_diffusers_version": diffusers.__version__}
    index.update({k: v for k, v in MODEL_INDEX.items() if k != "_class_name"})
    (export_dir / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    return export_dir


# -- the loop -----------------------------------------------------------------------------


def save_sample_grid(parts: Parts, tokenizer, config: TextTrainConfig, path: Path) -> None:
    """8 prompts (rows, :data:`GRID_PROMPTS`) x 8 seeds with the EMA weights, as a PNG."""
    from hmine.imaging import write_image_grid
    from hmine.textworld.sampling import TextWorldModel, sample

    was = parts.training
    parts.eval()
    model = TextWorldModel(parts.unet, parts.text_encoder, tokenizer, tw.build_scheduler(config))
    prompts = [p for p in GRID_PROMPTS for _ in range(8)]
    images = sample(model, prompts, guidance_scale=config.sample_guidance_scale, steps=config.sample_steps, seed=0)
    parts.train(was)
    write_image_grid(images, path, columns=8, upscale=2)


def train(
    config: TextTrainConfig,
    work_dir: Path,
    export_dir: Path | None = None,
    *,
    until_step: int | None = None,
    handle_signals: bool = False,
    device: str | torch.device | None = None,
) -> TrainResult:
    """Train (or resume) a run; return the EMA parts, the step reached and any stopping signal.

    Parameters
    ----------
    config : TextTrainConfig
    work_dir : Path
        See the module docstring.
    export_dir : Path, optional
        Write the EMA model reached in the package layout there (:func:`export_model`);
        before ``config.steps`` this is a snapshot of an unfinished run.
    until_step : int, optional
        Stop with a checkpoint at this step; a later call continues to ``config.steps``.
    handle_signals : bool
        Stop after the current step with a checkpoint on SIGINT / SIGTERM (the CLI's
        setting); the exit status is left to the caller (``stopped_by``, also in the log).
    device : str or torch.device, optional
        Where the model, its EMA, the optimizer state and the batches live (module
        docstring, "Devices"); by default CUDA where available, else the CPU. The EMA parts
        returned stay there.
    """
    device = resolve_device(device)
    torch.set_num_threads(config.torch_threads)
    work_dir = Path(work_dir)
    tokenizer = ensure_run_files(config, work_dir)
    parts = build_parts(config, tokenizer)
    if config.init_from is not None and latest_checkpoint(work_dir) is None:
        try:
            parts.load_state_dict(initial_weights(Path(config.init_from), tokenizer))
        except RuntimeError as error:  # strict load: the architecture differs from the config's
            raise ValueError(
                f"init_from {config.init_from} does not fit this config's model: {str(error).splitlines()[0]}"
            ) from None
    parts.to(device)  # before the optimizer and the loop's EMA; a checkpoint loads onto it
    scheduler = tw.build_scheduler(config)
    trainee = Trainee(
        model=parts,
        optimizer=torch.optim.AdamW(parts.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay),
        loss=lambda step: (training_loss(parts, tokenizer, scheduler, config, step), {}),
        learning_rate_at=config.learning_rate_at,
        sample_grid=lambda ema, path: save_sample_grid(ema, tokenizer, config, path),
    )
    schedule = Schedule(
        steps=config.steps,
        checkpoint_every=config.checkpoint_every,
        log_every=config.log_every,
        keep_checkpoints=config.keep_checkpoints,
        ema_decay=config.ema_decay,
        ema_snapshot_every=config.ema_snapshot_every,
        sample_every=config.sample_every,
        clip_grad_norm=1.0,
    )
    result = train_loop(trainee, schedule, work_dir, until_step=until_step, handle_signals=handle_signals)
    if export_dir is not None:
        if result.step < config.steps:
            logger.warning("exporting the EMA weights of step %d of %d (the run is not finished)", result.step, config.steps)
        export_model(result.model, tokenizer, config, Path(export_dir))
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hmine.textworld.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--export-dir", type=Path)
    parser.add_argument("--until-step", type=int)
    parser.add_argument(
        "--init-from",
        type=Path,
        help="start a new work dir from these weights (an exported model folder or a work dir); sets the config's init_from",
    )
    parser.add_argument(
        "--device",
        help="where to train: cpu, cuda, cuda:N (default: cuda if available, else cpu); not part of the config, "
        "so a run may resume on another device",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    try:
        device = resolve_device(args.device, "--device")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        config = load_config(args.config)
        if args.init_from is not None:
            config = config.model_copy(update={"init_from": args.init_from})
    except Exception as error:  # a bad config is refused in one line
        print(f"error: {args.config}: {error}", file=sys.stderr)
        return 2
    logger.info("training on %s", device)
    result = train(config, args.work_dir, args.export_dir, until_step=args.until_step, handle_signals=True, device=device)
    logger.info("at step %d of %d; work dir %s", result.step, config.steps, args.work_dir)
    return 0 if result.stopped_by is None else 128 + int(result.stopped_by)


if __name__ == "__main__":
    sys.exit(main())
