"""Learn stage: Asyrp's learned edits (Δh_t and the delta block) for every ``learn.targets`` entry.

Outputs in the run directory:

``learned.zarr``
    A direction store (directions.zarr's schema, method ``learned``): ``learned/<target>``
    (the trained Δh_t) and ``learned-block-mean/<target>`` (the block's mean edit), with
    ``learned_scale`` (:mod:`hmine.learning.store`); its attributes record the stage's
    input identity, the blocks' files and sha256 (``hmine:delta_blocks``), and each
    training's seconds, steps and final loss (``hmine:training``).
``learn/<target>/<kind>/``
    The training work dirs (kind ``delta_h`` or ``delta_block``) of
    :func:`hmine.world.training.train_loop`: checkpoints (safetensors + JSON), ``log.jsonl``.
    A rerun resumes each from its newest checkpoint; a work dir written under other
    settings or from other samples is started over.
``learn/blocks/<target>.safetensors``
    The trained delta block (:func:`hmine.learning.store.load_block_editor`).

Training uses the run's sampler (steps, eta, h position, threads) on the run's LAST
``learn.n_train`` samples' seeds, so the edit stage's first samples stay held out.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import uuid
from pathlib import Path

from hmine.config import RunConfig
from hmine.stages.sample import StageResult, make_sampler, samples_path
from hmine.stores import STORE_UUID

logger = logging.getLogger(__name__)

LEARNED_STORE = "learned.zarr"
WORK_DIR = "learn"
KINDS = ("delta_h", "delta_block")


def learned_path(config: RunConfig) -> Path:
    return config.run_dir / LEARNED_STORE


def block_path(config: RunConfig, target: str) -> Path:
    return config.run_dir / WORK_DIR / "blocks" / f"{target}.safetensors"


def leakage_attributes(config: RunConfig, target) -> list[str]:
    """The attributes a classifier target's leakage term keeps: its own list, or label.attributes but its own."""
    chosen = target.leakage_attributes if target.leakage_attributes is not None else config.label.attributes
    return [a for a in chosen if a != target.attribute]


def check_learn(config: RunConfig) -> None:
    """Preflight, loading no weights: an unconditional model, and classifier targets the world classifier scores."""
    if not config.learn.targets:
        return
    if config.sample.text is not None:
        raise ValueError("learn.targets is set, but sample.text makes the model text-conditional; the learn stage "
                         "trains on unconditional models only: empty learn.targets")  # fmt: skip
    from hmine.learning.losses import WORLD_ATTRIBUTES

    known = list(WORLD_ATTRIBUTES)
    for target in (t for t in config.learn.targets if t.kind == "classifier"):
        field = f"learn.targets[{target.name}]"
        if target.attribute not in known:
            raise ValueError(f"{field}.attribute is {target.attribute!r}, which the world classifier does not score; use one of {known}")
        unknown = [a for a in leakage_attributes(config, target) if a not in known]
        if unknown and target.leakage_attributes is not None:
            raise ValueError(f"{field}.leakage_attributes names {unknown}, which the world classifier does not score; use {known}")
        if unknown:
            raise ValueError(f"{field}.leakage_attributes is unset, so it keeps label.attributes, and the world classifier "
                             f"does not score {unknown}; set {field}.leakage_attributes to some of {known}")  # fmt: skip


def make_loss(config: RunConfig, target):
    """The loss of one ``learn.targets`` entry (:mod:`hmine.learning.losses`)."""
    from hmine.learning.losses import ClassifierTarget, ClipDirectional, ClipEmbedder

    if target.kind == "clip":
        embedder = ClipEmbedder(target.clip_model_id, target.clip_revision, device=config.model.device)
        return ClipDirectional(embedder, target.source, target.target, target_weight=target.target_weight, l1_weight=target.l1_weight)
    from hmine.labelling import embedded_classifier_path
    from hmine.world.classifier import load_classifier

    classifier = load_classifier(config.label.classifier_path or embedded_classifier_path()).to(config.model.device)
    return ClassifierTarget(
        classifier, target.attribute, toward=target.toward, leakage_attributes=leakage_attributes(config, target),
        target_weight=target.target_weight, leakage_weight=target.leakage_weight, l1_weight=target.l1_weight,
    )  # fmt: skip


def _work_record(config: RunConfig, target, kind: str) -> dict:
    """What a work dir's checkpoints were trained under: a different record starts it over.

    It holds the target's loss model (a changed classifier or CLIP model trains again) but
    not the other targets' settings, so changing one target leaves the others' trainings.
    """
    from hmine.stages import output_identity
    from hmine.stages.builtin import loss_model_identity

    settings = config.learn.model_dump(mode="json", exclude={"targets", "checkpoint_every", "delta_h", "delta_block"})
    return {"target": target.model_dump(mode="json"), "kind": kind, "settings": settings,
            "leakage": leakage_attributes(config, target), "loss_model": loss_model_identity(config, target),
            "samples": output_identity(config, "sample")}  # fmt: skip


def _prepare_work_dir(work: Path, record: dict) -> None:
    from hmine.world.training import write_json_atomic

    path = work / "config.json"
    if path.is_file() and json.loads(path.read_text()) != record:
        logger.info("learn stage: %s was trained under other settings; starting it over", work)
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    if not path.is_file():
        write_json_atomic(record, path)


def _editor(kind: str, h_shape, edit_steps, config: RunConfig):
    import torch

    from hmine.learning.delta_block import DeltaBlock
    from hmine.learning.editors import BlockEditor, DeltaH

    if kind == "delta_h":
        return DeltaH(h_shape, edit_steps)
    torch.manual_seed(config.learn.seed)  # the block's initial weights
    return BlockEditor(DeltaBlock(h_shape[0], config.learn.time_embedding_dim), edit_steps)


def _train_target(config: RunConfig, sampler, target, train_seeds, edit_steps, h_shape) -> dict:
    """Train every configured kind for one target; returns kind -> (trained editor, training record)."""
    from hmine.learning.train import train_editor

    learn, loss_fn, out = config.learn, make_loss(config, target), {}
    for kind in (k for k in KINDS if getattr(learn, k)):
        work = config.run_dir / WORK_DIR / target.name / kind
        _prepare_work_dir(work, _work_record(config, target, kind))
        editor = _editor(kind, h_shape, edit_steps, config)
        started = time.perf_counter()
        result = train_editor(
            sampler, editor, loss_fn, train_seeds, edit_steps, work, steps=learn.steps, batch_size=learn.batch_size,
            learning_rate=learn.learning_rate if kind == "delta_h" else learn.block_learning_rate,
            seed=learn.seed, checkpoint_every=learn.checkpoint_every,
        )  # fmt: skip
        log = [json.loads(line) for line in (work / "log.jsonl").read_text().splitlines() if line.strip()]
        losses = [r["loss"] for r in log if "loss" in r]
        out[kind] = (result.model, {"seconds_this_run": round(time.perf_counter() - started, 2), "steps": result.step,
                                    "final_loss": losses[-1] if losses else None, "first_loss": losses[0] if losses else None})  # fmt: skip
        logger.info("learn stage: %s %s trained to step %d", target.name, kind, result.step)
    return out


def _unmark_complete(path: Path) -> None:
    """Take the complete mark off an existing ``learned.zarr`` (write, then mark done: the
    new store is marked when written, and a kill in between leaves no complete store that
    records other blocks than the files on disk)."""
    from hmine.stores import COMPLETE, open_group, store_state

    if store_state(path) == "complete":
        group = open_group(path, mode="r+")
        group.attrs.put({k: v for k, v in group.attrs.asdict().items() if k != COMPLETE})


def run_learn_stage(config: RunConfig, *, model=None, show_progress: bool = True) -> StageResult:
    """Train each target's configured kinds (resuming), then write ``learned.zarr`` and the blocks."""
    import xarray as xr

    from hmine.directions import write_directions
    from hmine.editing import edit_steps_from
    from hmine.learning.store import BLOCK_MEAN_PREFIX, LEARNED_PREFIX, block_mean_delta, learned_direction_dataset, save_block
    from hmine.stages import identity_record, up_to_date

    started, path, learn = time.perf_counter(), learned_path(config), config.learn
    if not learn.targets:
        logger.info("learn stage: learn.targets is empty, nothing to learn")
        return StageResult(path, 0, 0, 0, 0, 0.0)
    check_learn(config)
    if up_to_date(config, "learn"):
        logger.info("learn stage: %s is up to date", path)
        return StageResult(path, len(learn.targets), 0, len(learn.targets), 0, time.perf_counter() - started)
    h = xr.open_zarr(samples_path(config), consolidated=False)["h"]
    seeds = [int(s) for s in h["sample"].values]
    if learn.n_train > len(seeds):
        raise ValueError(f"learn.n_train is {learn.n_train} but the run has {len(seeds)} samples; lower learn.n_train")
    sampler = make_sampler(config, model)
    timesteps = [int(t) for t in sampler.timesteps]
    edit_steps = edit_steps_from(timesteps, learn.t_edit, learn.t_edit_max, section="learn")
    train_seeds, raws, trained_blocks, training = seeds[-learn.n_train :], [], {}, {}
    train_h = h.isel(sample=slice(len(seeds) - learn.n_train, None))  # lazy: block_mean_delta reads it by step and batch
    for target in learn.targets:
        trained = _train_target(config, sampler, target, train_seeds, edit_steps, tuple(h.shape[2:]))
        attribute = target.attribute or target.name
        if "delta_h" in trained:
            raws.append((LEARNED_PREFIX + target.name, attribute, trained["delta_h"][0].full().numpy()))
        if "delta_block" in trained:
            editor = trained["delta_block"][0]
            raws.append((BLOCK_MEAN_PREFIX + target.name, attribute, block_mean_delta(editor, train_h, timesteps)))
            trained_blocks[target.name] = editor.block
        training[target.name] = {kind: record for kind, (_, record) in trained.items()}
    ds = learned_direction_dataset(raws, h)
    _unmark_complete(path)  # the old store stops vouching for the block files before they are replaced
    blocks = {}
    for name, block in trained_blocks.items():
        sha = save_block(block, block_path(config, name), edit_steps, timesteps, name)
        blocks[name] = {"path": str(block_path(config, name).relative_to(config.run_dir)), "sha256": sha}
    ds.attrs.update({"hmine:config_hash": config.stage_hash("learn"), **identity_record(config, "learn"),
                     STORE_UUID: uuid.uuid4().hex, "hmine:delta_blocks": json.dumps(blocks, sort_keys=True),
                     "hmine:training": json.dumps(training, sort_keys=True)})  # fmt: skip
    write_directions(ds, path)
    seconds = time.perf_counter() - started
    logger.info("learn stage: %d targets in %.1f s", len(learn.targets), seconds)
    return StageResult(path, len(learn.targets), len(learn.targets), 0, 0, seconds)


def learned_damaged(config: RunConfig) -> int:
    """1 when a complete ``learned.zarr`` lost a chunk or a delta block's file changed or went missing."""
    from hmine.chunk_checks import all_chunks_intact
    from hmine.learning.store import file_sha256
    from hmine.stores import open_group, store_state

    path = learned_path(config)
    if store_state(path) != "complete":
        return 0
    if not all_chunks_intact(path, ["direction"]):
        return 1
    blocks = json.loads(open_group(path).attrs.get("hmine:delta_blocks", "{}"))
    for entry in blocks.values():
        block = config.run_dir / entry["path"]
        if not block.is_file() or file_sha256(block) != entry["sha256"]:
            return 1
    return 0
