"""The embedded shapes world: its renderer, its exact denoiser, its classifier and the training of its models.

The renderer's names are this package's top level (``from hmine import world;
world.generate(n, seed)``); the rest lives in sub-modules that load torch only when used:

=================================  ==========================================================
module                             concern
=================================  ==========================================================
:mod:`hmine.world.renderer`        factors, rendering, binary attributes, foreground masks
:mod:`hmine.world.denoiser`        the exact (posterior-mean) denoiser of a world sample
:mod:`hmine.world.classifier`      the attribute classifier: network, scoring, persistence,
                                   augmentation, its training
:mod:`hmine.world.ddpm`            the unconditional DDPM: U-Net, scheduler, its training, export
:mod:`hmine.world.training`        the one training loop: resumable checkpoints, EMA, learning
                                   rate, logging, atomic saves
=================================  ==========================================================

The trained models ship as package data in ``hmine/embedded/`` with their model cards.
"""

from hmine.world.renderer import (
    BG_LIGHT_THRESHOLD,
    BG_MAX,
    BG_MIN,
    BINARY_ATTRIBUTES,
    CENTER,
    COLORS,
    CONTINUOUS_FACTORS,
    DISCRETE_FACTORS,
    IMAGE_SIZE,
    P_RED_GIVEN_CIRCLE,
    PALETTE,
    SHAPES,
    SIZE_LARGE_THRESHOLD,
    SIZE_MAX,
    SIZE_MIN,
    WorldBatch,
    binary_attributes,
    foreground_mask,
    generate,
    render,
    sample_factors,
    shape_coverage,
)

__all__ = [
    "BG_LIGHT_THRESHOLD",
    "BG_MAX",
    "BG_MIN",
    "BINARY_ATTRIBUTES",
    "CENTER",
    "COLORS",
    "CONTINUOUS_FACTORS",
    "DISCRETE_FACTORS",
    "IMAGE_SIZE",
    "P_RED_GIVEN_CIRCLE",
    "PALETTE",
    "SHAPES",
    "SIZE_LARGE_THRESHOLD",
    "SIZE_MAX",
    "SIZE_MIN",
    "WorldBatch",
    "binary_attributes",
    "foreground_mask",
    "generate",
    "render",
    "sample_factors",
    "shape_coverage",
]
