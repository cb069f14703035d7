"""The registry entries of hmine's own stages, in run order.

Each entry names the stage's run function, its output, what it reads, its own part of
the config hash, its other inputs, its chunk check, its preflight checks and its report
section (see :mod:`hmine.stages`). Heavy modules are imported only when a hook runs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hmine.stages import Stage, register

if TYPE_CHECKING:
    from hmine.config import RunConfig


# -- config-hash settings: what each stage adds to the hash of the stages it reads -------


def sample_settings(config: "RunConfig") -> dict:
    from hmine.identity import model_identity

    # where it runs is not what it gives, nor whether it is compiled (float rounding, like
    # the batch size; docs/precision.md); the precision joins the hash only below float32,
    # so runs from before the setting keep their hash
    exclude = {"device", "compile"} | ({"precision"} if config.model.precision == "float32" else set())
    model = config.model.model_dump(mode="json", exclude=exclude)
    model["weights"] = model_identity(config.model.id, config.model.revision)
    # sample.text joins the hash only when set (runs of unconditional models keep theirs);
    # edit_branches changes edits, not samples: it is in the edit stage's settings
    text = {"text"} if config.sample.text is None else {"text": {"edit_branches"}}
    return {"model": model, "sample": config.sample.model_dump(mode="json", exclude=text)}


def label_settings(config: "RunConfig") -> dict:
    from hmine.identity import labeller_identity

    return {
        "label": config.label.model_dump(mode="json", exclude={"batch_size"}),
        "labeller": labeller_identity(config.label),
    }


def directions_settings(config: "RunConfig") -> dict:
    # the source fields and prompt pairs join the hash only when set, so existing stores stay valid
    exclude = set() if config.directions.source == "inversions" else {"source", "inversion_labels"}
    exclude |= {"prompt_pairs"} if config.directions.prompt_pairs is None else set()
    return {"directions": config.directions.model_dump(mode="json", exclude=exclude or None)}


def directions_optional_reads(config: "RunConfig") -> tuple[str, ...]:
    return ("invert",) if config.directions.source == "inversions" else ()


def jacobian_settings(config: "RunConfig") -> dict:
    # batch_size changes only how many pairs share a U-Net call (hmine.jacobian.batched)
    return {"jacobian": config.jacobian.model_dump(mode="json", exclude={"batch_size"})}


def invert_settings(config: "RunConfig") -> dict:
    if config.images is None:
        return {"invert": None}
    model = sample_settings(config)["model"]
    sampling = config.sample.model_dump(mode="json", include={"num_inference_steps", "torch_threads"})
    return {"invert": {
        "images": config.images.model_dump(mode="json"),
        "invert": config.invert.model_dump(mode="json"),
        "model": model,
        "sampling": sampling,
    }}


def loss_model_identity(config: "RunConfig", target) -> str:
    """What a ``learn.targets`` entry's loss model is: CLIP's revision or weights, or the world classifier's weights."""
    from hmine.identity import model_identity, weights_fingerprint

    if target.kind == "clip":
        return model_identity(target.clip_model_id, target.clip_revision)
    from hmine.labelling import embedded_classifier_path

    return weights_fingerprint(config.label.classifier_path or embedded_classifier_path())


def learn_settings(config: "RunConfig") -> dict:
    learn = config.learn
    if not learn.targets:
        return {"learn": None}
    loss_models = {t.name: loss_model_identity(config, t) for t in learn.targets}
    # checkpoint_every changes only where a training can resume from, not what it computes
    return {"learn": {**learn.model_dump(mode="json", exclude={"checkpoint_every"}),
                      "attributes": list(config.label.attributes), "loss_models": loss_models}}  # fmt: skip


def edit_settings(config: "RunConfig") -> dict:
    from hmine.interval_config import interval_in_use

    # the source joins the hash only when set, so edits of samples keep their hash
    exclude = {"batch_size", "strip_samples"} | ({"source"} if config.edit.source == "samples" else set())
    # the editing interval's settings join the hash only when used, so earlier edits keep their hash
    exclude |= {"t_boost"} if config.edit.t_boost is None else set()
    exclude |= {"interval"} if not interval_in_use(config.edit) else set()
    exclude |= {"sega"} if config.edit.sega is None else set()  # SEGA's concepts: only when set
    settings = {"edit": config.edit.model_dump(mode="json", exclude=exclude)}
    if config.sample.text is not None:  # the guidance branches an edit adds its delta in
        settings["edit_branches"] = config.sample.text.edit_branches
    return settings


def benchmark_settings(config: "RunConfig") -> dict:
    # enabled says only whether `hmine run` runs it; batch_size only how rows share a U-Net call;
    # jacobian only when the run has per-image directions (hashes without them stay as they were)
    edit = config.edit.model_dump(mode="json", include={"t_edit", "t_edit_max", "asymmetric"})
    exclude = {"enabled", "batch_size"} | (set() if config.jacobian.n_samples > 0 else {"jacobian"})
    return {"benchmark": {**config.benchmark.model_dump(mode="json", exclude=exclude), "edit": edit}}


def benchmark_reads_jacobian(config: "RunConfig") -> bool:
    return config.benchmark.jacobian and config.jacobian.n_samples > 0


def benchmark_optional_reads(config: "RunConfig") -> tuple[str, ...]:
    return ("jacobian",) if benchmark_reads_jacobian(config) else ()  # new Jacobian directions make it stale


def benchmark_applies(config: "RunConfig") -> bool:
    # asked for in every run, or run once by `hmine benchmark` in this run directory
    return config.benchmark.enabled or (config.run_dir / "benchmark.parquet").exists()


# -- other inputs ----------------------------------------------------------------------


def directions_extra_inputs(config: "RunConfig") -> dict:
    from hmine.directions import PCA_SOLVER

    return {"pca_solver": PCA_SOLVER}  # a store fitted by another solver is fitted again


def jacobian_extra_inputs(config: "RunConfig") -> dict:
    from hmine.masks import mask_hash

    return {"masks": mask_hash(config)}  # mask files can change under the same config


def invert_extra_inputs(config: "RunConfig") -> dict:
    from hmine.image_sources import source_fingerprint

    return {} if config.images is None else {"images": source_fingerprint(config.images)}  # files can change


def edit_optional_reads(config: "RunConfig") -> tuple[str, ...]:
    from hmine.edit_names import term_names
    from hmine.learning.edit_directions import learned_prefix
    from hmine.per_image import JACOBIAN_PREFIX

    names = term_names(config.edit.directions)  # the directions of combinations too
    learned = ("learn",) if any(learned_prefix(n) for n in names) else ()  # new learned results make the edits stale
    if config.edit.source == "inversions":  # new inversions make the edits stale
        return ("invert", *learned)
    return (*(("jacobian",) if any(n.startswith(JACOBIAN_PREFIX) for n in names) else ()), *learned)


# -- chunk checks ------------------------------------------------------------------------


def samples_damaged(config: "RunConfig") -> int:
    from hmine.stages.sample import damaged_sample_batches

    return len(damaged_sample_batches(config.run_dir / "samples.zarr"))


def directions_damaged(config: "RunConfig") -> int:
    from hmine.chunk_checks import CHUNK_CHECKED_ARRAYS, all_chunks_intact
    from hmine.stores import store_state

    path = config.run_dir / "directions.zarr"
    if store_state(path) != "complete":
        return 0
    return 0 if all_chunks_intact(path, CHUNK_CHECKED_ARRAYS["directions.zarr"]) else 1


def jacobian_damaged(config: "RunConfig") -> int:
    from hmine.stages.jacobian import damaged_jacobian_entries

    return len(damaged_jacobian_entries(config.run_dir / "jacobian.zarr"))


def inversions_damaged(config: "RunConfig") -> int:
    from hmine.stages.invert import damaged_inversion_batches

    return len(damaged_inversion_batches(config.run_dir / "inversions.zarr"))


def learned_damaged(config: "RunConfig") -> int:
    from hmine.stages.learn import learned_damaged as damaged

    return damaged(config)


def edits_damaged(config: "RunConfig") -> int:
    from hmine.chunk_checks import CHUNK_CHECKED_ARRAYS, damaged_entries
    from hmine.stores import open_group, store_state

    path = config.run_dir / "edits.zarr"
    if store_state(path) != "complete":  # a partial store is resumed by the stage anyway
        return 0
    return len(damaged_entries(open_group(path), path, CHUNK_CHECKED_ARRAYS["edits.zarr"]))


def edits_complete(config: "RunConfig") -> bool:
    from hmine.stages.edit import effects_measured_from
    from hmine.stores import store_state

    path = config.run_dir / "edits.zarr"
    return store_state(path) == "complete" and effects_measured_from(path)


# -- preflight -----------------------------------------------------------------------------


def check_model(config: "RunConfig") -> None:
    from hmine.models import check_model_source

    check_model_source(config.model.id)


def check_text(config: "RunConfig") -> None:
    from hmine.text_models import check_run_text

    check_run_text(config)


def check_labeller(config: "RunConfig") -> None:
    from hmine.labelling import labeller_attributes

    scored = labeller_attributes(config.label)
    missing = [a for a in config.label.required_attributes if a not in scored]
    if missing:
        raise ValueError(
            f"label.attributes names {missing}, which the {config.label.labeller} labeller does not "
            f"score; it scores {list(scored)}"
        )


def check_images(config: "RunConfig") -> None:
    """The image folder and label file exist and the label file reads (no image is decoded here)."""
    from hmine.image_sources import list_image_files, read_labels

    if config.images is None or config.images.world is not None:
        return
    if not list_image_files(config.images.folder):
        raise FileNotFoundError(
            f"images.folder {config.images.folder} holds no .png/.jpg/.jpeg files; point it at a folder of images"
        )
    if config.images.labels is not None:
        read_labels(config.images.labels)


def check_benchmark(config: "RunConfig") -> None:
    from hmine.stages.benchmark import check_benchmark as check

    check(config)


def check_learned_edits(config: "RunConfig") -> None:
    from hmine.learning.edit_directions import check_learned_edits as check

    check(config)


def check_learn(config: "RunConfig") -> None:
    from hmine.stages.learn import check_learn as check

    check(config)


def check_sega_edits(config: "RunConfig") -> None:
    from hmine.sega_edits import check_sega_edits as check

    check(config)


def check_prompt_pairs(config: "RunConfig") -> None:
    from hmine.stages.directions import check_prompt_pairs as check

    check(config)


def check_masks(config: "RunConfig") -> None:
    from hmine.masks import check_mask_files

    check_mask_files(config)


SAMPLE = register(Stage(
    name="sample",
    summary="stage 1: sample images and store per-step h",
    run="hmine.stages.sample:run_sample_stage",
    output="samples.zarr",
    settings=sample_settings,
    intact=samples_damaged,
    preflight=(check_model, check_text),
    report_section="hmine.report:sample_section",
))
INVERT = register(Stage(  # reads nothing: only the model and the images of the images: section
    name="invert",
    summary="invert the images of the images: section (DDIM or edit-friendly) and store their per-step h",
    run="hmine.stages.invert:run_invert_stage",
    output="inversions.zarr",
    settings=invert_settings,
    extra_inputs=invert_extra_inputs,
    intact=inversions_damaged,
    preflight=(check_model, check_images),
    applies=lambda config: getattr(config, "images", None) is not None,
))
LABEL = register(Stage(
    name="label",
    summary="stage 2: score every sample's image with the labeller",
    run="hmine.stages.label:run_label_stage",
    output="labels.parquet",
    settings=label_settings,
    reads=("sample",),
    preflight=(check_labeller,),
    report_section="hmine.report:label_section",
))
DIRECTIONS = register(Stage(
    name="directions",
    summary="stage 3: PCA, mean-difference, probe, conditional and regression directions",
    run="hmine.stages.directions:run_directions_stage",
    output="directions.zarr",
    settings=directions_settings,
    reads=("sample", "label"),
    optional_reads=directions_optional_reads,
    extra_inputs=directions_extra_inputs,
    intact=directions_damaged,
    preflight=(check_labeller, check_prompt_pairs),
    report_section="hmine.report:directions_section",
))
JACOBIAN = register(Stage(  # before the edit stage, which can apply per-image Jacobian directions
    name="jacobian",
    summary="stage 4: per-image Jacobian directions by block Krylov iteration",
    run="hmine.stages.jacobian:run_jacobian_stage",
    output="jacobian.zarr",
    settings=jacobian_settings,
    reads=("sample",),
    extra_inputs=jacobian_extra_inputs,
    intact=jacobian_damaged,
    preflight=(check_model, check_masks),
    report_section="hmine.report:jacobian_section",
))
LEARN = register(Stage(  # before the edit stage, which can apply learned directions and delta blocks
    name="learn",
    summary="learn Asyrp's edits (a delta h per step and the delta block) for the learn.targets",
    run="hmine.stages.learn:run_learn_stage",
    output="learned.zarr",
    settings=learn_settings,
    reads=("sample",),
    intact=learned_damaged,
    preflight=(check_model, check_learn),
    applies=lambda config: bool(config.learn.targets),
))
EDIT = register(Stage(
    name="edit",
    summary="stage 5: apply directions (also per-image Jacobian ones) at several scales and measure the effect",
    run="hmine.stages.edit:run_edit_stage",
    output="edits.zarr",
    settings=edit_settings,
    reads=("sample", "directions"),
    optional_reads=edit_optional_reads,
    intact=edits_damaged,
    complete=edits_complete,
    preflight=(check_model, check_labeller, check_learned_edits, check_sega_edits),
    report_section="hmine.report:edit_section",
))
BENCHMARK = register(Stage(  # after the edit stage: its window and step rule; runs on demand (applies)
    name="benchmark",
    summary="benchmark every direction method against the world's known factors (strength to flip, leakage, quality)",
    run="hmine.stages.benchmark:run_benchmark_stage",
    output="benchmark.parquet",
    settings=benchmark_settings,
    reads=("sample", "label", "directions"),
    optional_reads=benchmark_optional_reads,
    preflight=(check_model, check_labeller, check_benchmark),
    report_section="hmine.benchmark.report:benchmark_section",
    applies=benchmark_applies,
))
REPORT = register(Stage(
    name="report",
    summary="write the HTML report of a run",
    run="hmine.report:run_report_stage",
    output=None,
))
