"""The one training loop of the embedded models: resumable checkpoints, EMA, learning rate, logging.

The DDPM (:mod:`hmine.world.ddpm`), the classifier (:mod:`hmine.world.classifier.training`)
and the text-conditional model (:mod:`hmine.textworld.train`) each supply a
:class:`Trainee` — the module, its optimizer, the loss of step ``s`` and the learning rate
of step ``s`` — and a :class:`Schedule`; :func:`train_loop` does the rest. Training is
built to span sessions on a CPU: a rerun with the same config continues from the newest
checkpoint, and since every trainer draws the data and noise of step ``s`` from generators
seeded by ``(seed, s)``, a resumed run computes exactly what an uninterrupted one would.

Work directory
--------------
``config.json``
    The run's config (:func:`check_work_dir_config`); a work dir written by another config
    is refused.
``checkpoints/step-NNNNNN/``
    ``model.safetensors`` (the trained weights), ``ema.safetensors`` (their EMA, when the
    run keeps one), ``optimizer.safetensors`` (the optimizer's tensors) and ``state.json``
    (the step and the optimizer's param groups). Safetensors and JSON only, never pickle.
    The newest ``keep_checkpoints`` are kept.
``latest.json``
    Names the newest complete checkpoint; replaced atomically after its folder is fully
    written (and fsynced), so a kill at any moment leaves a checkpoint to resume from.
``log.jsonl``
    One record per ``log_every`` steps (and at the last step): step, loss and its parts,
    gradient norm (when clipped), learning rate, seconds.
``ema/ema-NNNNNN.safetensors``
    The EMA weights of every ``ema_snapshot_every`` steps (when set).
``grid-NNNNNN.png``
    Every ``sample_every`` steps and at the end, when the trainer draws sample grids.

With ``handle_signals``, SIGINT and SIGTERM end the run after the current step with a
checkpoint; the caller decides the exit status (:attr:`TrainResult.stopped_by`).

Devices
-------
The loop trains the trainee's module where it is: a trainer moves it to its device before
building the optimizer (the text trainer's ``--device``; the DDPM and the classifier train
on the CPU), and its ``loss`` puts the batches there. The EMA is a copy on the same device.
Checkpoints are device-independent: written from CPU copies of the tensors, read on the CPU
and copied into the module where it is (``load_state_dict``; the optimizer's state follows
its parameters' device), so a checkpoint written on a GPU resumes on the CPU and vice versa.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import torch
from pydantic import BaseModel

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
LOG_FILE = "log.jsonl"
LATEST_FILE = "latest.json"


def warmup_cosine(step: int, *, peak: float, warmup_steps: int, steps: int, floor: float = 0.0) -> float:
    """Linear warm-up over ``warmup_steps``, then cosine decay to ``floor`` x ``peak`` at ``steps``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, steps - warmup_steps))
    return float(peak * (floor + (1 - floor) * 0.5 * (1 + np.cos(np.pi * progress))))


# -- atomic files ---------------------------------------------------------------------------


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(data, path: Path) -> None:
    """Write JSON to a temporary file, fsync, rename over ``path``, fsync the folder."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(json.dumps(data, indent=2) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def check_work_dir_config(config: BaseModel, work_dir: Path) -> None:
    """Write ``config.json`` into a new work dir, or refuse one written by another config."""
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    path = work_dir / CONFIG_FILE
    if not path.exists():
        write_json_atomic(json.loads(config.model_dump_json()), path)
        return
    stored = type(config).model_validate_json(path.read_text())
    if stored != config:
        changed = sorted(k for k in type(config).model_fields if getattr(stored, k) != getattr(config, k))
        raise ValueError(
            f"work_dir {work_dir} was written by another config (differs in {changed}); "
            f"use a new work_dir or the config in its {CONFIG_FILE}"
        )


# -- checkpoints: safetensors + JSON ----------------------------------------------------------


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state dict split into flat tensors (``state.<param>.<key>``) and JSON-able rest."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, entry in state["state"].items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """The inverse of :func:`optimizer_tensors`."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta.get("scalars", {}).items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(work_dir: Path, step: int, model, ema, optimizer, keep: int) -> Path:
    """Write ``checkpoints/step-<step>/`` and point ``latest.json`` at it; prune old ones."""
    root = Path(work_dir) / "checkpoints"
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:06d}"
    tmp = root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _save_tensors(model.state_dict(), tmp / "model.safetensors")
    if ema is not None:
        _save_tensors(ema.state_dict(), tmp / "ema.safetensors")
    opt_tensors, opt_meta = optimizer_tensors(optimizer)
    _save_tensors(opt_tensors, tmp / "optimizer.safetensors")
    write_json_atomic({"step": step, "optimizer": opt_meta}, tmp / "state.json")
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_json_atomic({"checkpoint": final.name, "step": step}, Path(work_dir) / LATEST_FILE)
    for old in sorted(root.glob("step-*"))[:-keep]:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete checkpoint folder of a work dir, or None."""
    pointer = Path(work_dir) / LATEST_FILE
    if not pointer.is_file():
        return None
    folder = Path(work_dir) / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
    if not (folder / "state.json").is_file():
        raise FileNotFoundError(f"{pointer} names {folder}, which is missing or incomplete")
    return folder


def load_checkpoint(folder: Path, model, ema, optimizer) -> int:
    """Load a checkpoint into the modules and optimizer (``ema`` may be None); return its step.

    The tensors are read on the CPU and land on the device of the modules' parameters.
    """
    from safetensors.torch import load_file

    state = json.loads((folder / "state.json").read_text())
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    if ema is not None:
        ema.load_state_dict(load_file(str(folder / "ema.safetensors")))
    optimizer.load_state_dict(optimizer_state_from(load_file(str(folder / "optimizer.safetensors")), state["optimizer"]))
    return int(state["step"])


def checkpoint_weights(path: Path, which: str = "ema") -> dict[str, torch.Tensor] | None:
    """``which`` weights (``ema`` or ``model``) of a work dir's newest checkpoint or of a checkpoint folder.

    None when ``path`` is neither (e.g. a model folder in diffusers layout).
    """
    from safetensors.torch import load_file

    path = Path(path)
    folder = latest_checkpoint(path) if (path / LATEST_FILE).is_file() else path
    weights = folder / f"{which}.safetensors"
    if not ((folder / "state.json").is_file() and weights.is_file()):
        return None
    return load_file(str(weights))


# -- the loop ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """When the loop stops, checkpoints, logs, samples; and its EMA and gradient clipping.

    :param steps: optimizer steps of the whole run.
    :param checkpoint_every: steps between checkpoints (one is also written at the stop).
    :param log_every: steps between ``log.jsonl`` records (one is also written at the stop).
    :param keep_checkpoints: how many of the newest checkpoints are kept.
    :param ema_decay: decay of the weights' EMA, or None for a run without one.
    :param ema_snapshot_every: also keep the EMA of every this many steps in ``ema/`` (0: never).
    :param sample_every: steps between sample grids (also one at ``steps``); 0: never.
    :param clip_grad_norm: clip the gradients' total norm to this, or None.
    """

    steps: int
    checkpoint_every: int
    log_every: int
    keep_checkpoints: int = 2
    ema_decay: float | None = None
    ema_snapshot_every: int = 0
    sample_every: int = 0
    clip_grad_norm: float | None = None


@dataclass
class Trainee:
    """What a trainer supplies to :func:`train_loop`.

    :param model: the module trained, freshly built (seeded) and in train mode.
    :param optimizer: its optimizer, fresh; the loop sets its learning rate every step.
    :param loss: ``loss(step) -> (loss, parts)``, the loss of 0-based step ``step`` and its
        logged parts (a dict of scalar tensors, possibly empty).
    :param learning_rate_at: the learning rate of 0-based step ``step``.
    :param sample_grid: ``sample_grid(model, path)`` writes a PNG of samples of the EMA (or
        of the model, without one); None: no grids.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[int], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    learning_rate_at: Callable[[int], float]
    sample_grid: Callable[[torch.nn.Module, Path], None] | None = None


class TrainResult(NamedTuple):
    """What :func:`train_loop` returns."""

    model: torch.nn.Module
    """The EMA reached (the trained module, without an EMA), in eval mode."""
    step: int
    """The step of the last checkpoint written."""
    stopped_by: int | None
    """The signal that stopped the run early, or None."""


class _StopFlag:
    def __init__(self):
        self.signal: int | None = None

    def __call__(self, signum, frame):
        self.signal = signum


class _Run:
    """One call of :func:`train_loop`: the modules, the work dir, the step reached."""

    def __init__(self, trainee: Trainee, schedule: Schedule, work_dir: Path):
        self.trainee, self.schedule, self.work_dir = trainee, schedule, Path(work_dir)
        self.ema = None
        if schedule.ema_decay is not None:
            self.ema = copy.deepcopy(trainee.model).requires_grad_(False).eval()
        self.start = 0
        self.folder = latest_checkpoint(self.work_dir)
        if self.folder is not None:
            self.start = load_checkpoint(self.folder, trainee.model, self.ema, trainee.optimizer)
            logger.info("resumed from %s (step %d)", self.folder, self.start)
        self.started = time.perf_counter()

    @property
    def averaged(self) -> torch.nn.Module:
        return self.trainee.model if self.ema is None else self.ema

    def step(self, step: int) -> dict:
        """One optimizer step (and EMA update); returns its log record."""
        trainee, schedule = self.trainee, self.schedule
        lr = trainee.learning_rate_at(step)
        for group in trainee.optimizer.param_groups:
            group["lr"] = lr
        loss, parts = trainee.loss(step)
        trainee.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        record = {"step": step + 1, "loss": round(loss.item(), 6)}
        record.update({k: round(v.item(), 6) for k, v in parts.items()})
        if schedule.clip_grad_norm is not None:
            grad_norm = torch.nn.utils.clip_grad_norm_(trainee.model.parameters(), schedule.clip_grad_norm)
            record["grad_norm"] = round(float(grad_norm), 4)
        trainee.optimizer.step()
        if self.ema is not None:
            with torch.no_grad():
                # EMA warm-up: a short horizon early keeps the EMA from lagging.
                decay = min(schedule.ema_decay, (1 + step) / (10 + step))
                for pe, p in zip(self.ema.parameters(), trainee.model.parameters()):
                    pe.lerp_(p, 1 - decay)
        elapsed = time.perf_counter() - self.started
        record.update({"lr": lr, "seconds": round(elapsed, 2), "seconds_per_step": round(elapsed / (step + 1 - self.start), 3)})
        return record

    def checkpoint(self, done: int) -> None:
        schedule = self.schedule
        saved = save_checkpoint(self.work_dir, done, self.trainee.model, self.ema, self.trainee.optimizer, schedule.keep_checkpoints)
        if self.ema is not None and schedule.ema_snapshot_every and done % schedule.ema_snapshot_every == 0:
            (self.work_dir / "ema").mkdir(exist_ok=True)
            shutil.copyfile(saved / "ema.safetensors", self.work_dir / "ema" / f"ema-{done:06d}.safetensors")

    def after_step(self, record: dict, stop: int, log, stopping: bool) -> None:
        """Log, checkpoint and sample as the schedule says after the step ``record`` describes."""
        schedule, done = self.schedule, record["step"]
        if done % schedule.log_every == 0 or done == stop:
            log.write(json.dumps(record) + "\n")
            log.flush()
            logger.info("step %d loss %.4f (%.2f s/step)", done, record["loss"], record["seconds_per_step"])
        if done % schedule.checkpoint_every == 0 or done == stop or stopping:
            self.checkpoint(done)
        sample_now = schedule.sample_every and (done % schedule.sample_every == 0 or done == schedule.steps)
        if sample_now and self.trainee.sample_grid is not None:
            self.trainee.sample_grid(self.averaged, self.work_dir / f"grid-{done:06d}.png")


def train_loop(
    trainee: Trainee,
    schedule: Schedule,
    work_dir: Path,
    *,
    until_step: int | None = None,
    handle_signals: bool = False,
) -> TrainResult:
    """Train ``trainee`` (or resume it from ``work_dir``'s newest checkpoint) to ``schedule.steps``.

    Parameters
    ----------
    trainee : Trainee
    schedule : Schedule
    work_dir : Path
        See the module docstring; the trainer has written its ``config.json`` already
        (:func:`check_work_dir_config`).
    until_step : int, optional
        Stop with a checkpoint at this step; a later call continues to ``schedule.steps``.
    handle_signals : bool, default=False
        Stop after the current step with a checkpoint on SIGINT / SIGTERM (a CLI's
        setting); the stop is logged and returned as ``stopped_by``.

    Returns
    -------
    TrainResult
    """
    run = _Run(trainee, schedule, work_dir)
    stop = schedule.steps if until_step is None else min(schedule.steps, int(until_step))
    flag, previous = _StopFlag(), {}
    if handle_signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, flag)
    trainee.model.train()
    reached, stopped_by = max(run.start, stop), None
    try:
        with open(run.work_dir / LOG_FILE, "a") as log:
            for step in range(run.start, stop):
                record = run.step(step)
                stopped_by = flag.signal  # read once: a signal after this waits for the next step
                run.after_step(record, stop, log, stopping=stopped_by is not None)
                if stopped_by is not None:
                    reached = record["step"]
                    log.write(json.dumps({"step": reached, "stopped_by": signal.Signals(stopped_by).name}) + "\n")
                    break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if run.folder is None and run.start >= stop:
        run.checkpoint(run.start)
    trainee.model.eval()
    return TrainResult(run.averaged.eval(), reached, stopped_by)
