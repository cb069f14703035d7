"""The ground-truth benchmark: every direction method against the embedded world's known factors.

=====================================  ====================================================
module                                 concern
=====================================  ====================================================
:mod:`hmine.benchmark.settings`        the ``benchmark:`` config section
:mod:`hmine.benchmark.candidates`      the directions edited: stored ones, per-image
                                       Jacobian ones and the norm-matched random baseline
:mod:`hmine.benchmark.measure`         their edits through :func:`hmine.regeneration.regenerate`
                                       and effects (decisions, score changes, image quality)
:mod:`hmine.benchmark.table`           matching PCA components to factors, matched strength,
                                       the margin over the random baseline
:mod:`hmine.benchmark.report`          the report section (heat maps)
=====================================  ====================================================

The stage is :mod:`hmine.stages.benchmark` (``hmine benchmark CONFIG``). This package
imports nothing at its top level: :mod:`hmine.config` imports its settings module.
Per-image Jacobian directions are benchmarked on the samples the Jacobian stage analysed
(``benchmark.jacobian``), each along its own vectors, and matched to factors as PCA's are.
"""
