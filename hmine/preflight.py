"""Cheap checks of a run's inputs, before anything is written.

A stage finds a missing model folder, a labeller attribute that does not exist or a
mask of the wrong size only when it reaches it, by which time earlier stages have
written their stores and the run directory its lock and config. :func:`check_run_inputs`
does those checks up front, without loading weights or sampling anything, so that bad
input is refused with nothing written.
"""

from __future__ import annotations

from collections.abc import Iterable

from hmine.config import RunConfig

MODEL_STAGES = {"sample", "edit", "jacobian"}
LABELLER_STAGES = {"label", "directions", "edit"}


def check_run_inputs(config: RunConfig, stages: Iterable[str]) -> None:
    """Refuse (FileNotFoundError / ValueError, message naming the field and the fix) bad
    inputs of the given stages: the model folder, the labeller's attributes, mask files."""
    from hmine.models import check_model_source

    stages = set(stages)
    unet_config = check_model_source(config.model.id) if stages & MODEL_STAGES else None
    if stages & LABELLER_STAGES:
        from hmine.labelling import labeller_attributes

        scored = labeller_attributes(config.label)
        missing = [a for a in config.label.required_attributes if a not in scored]
        if missing:
            raise ValueError(
                f"label.attributes names {missing}, which the {config.label.labeller} labeller does not "
                f"score; it scores {list(scored)}"
            )
    jacobian = config.jacobian
    if "jacobian" in stages and jacobian.mask == "files" and jacobian.n_samples:
        from hmine.stages.jacobian import read_mask_file

        image_size = None  # unknown for a hub model before it is loaded: the stage checks it
        # a latent model's images are larger than its U-Net's input: the stage checks those too
        if unet_config is not None and unet_config.get("sample_size") and _is_pixel_model(config.model.id):
            size = unet_config["sample_size"]
            image_size = (size, size) if isinstance(size, int) else tuple(size)
        for seed in config.sample.seeds[: jacobian.n_samples]:
            read_mask_file(jacobian.mask_dir, seed, image_size)


def _is_pixel_model(model_id: str) -> bool:
    from pathlib import Path

    from hmine.models import EMBEDDED_MODEL_ID

    return model_id == EMBEDDED_MODEL_ID or not (Path(model_id) / "vqvae").exists()
