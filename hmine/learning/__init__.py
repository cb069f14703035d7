"""Learned h-space edits (Asyrp, Kwon et al. ICLR 2023): Δh_t and the delta block f_t(h, t).

Where the other methods find directions by statistics, these are trained through Asyrp's
asymmetric reverse process so that the edited image moves toward a target: a world
classifier's attribute (with a leakage term), or CLIP's direction between two texts.

=====================================  ==========================================================
module                                 concern
=====================================  ==========================================================
:mod:`hmine.learning.config`           the ``learn:`` config section (pydantic only)
:mod:`hmine.learning.delta_block`      :class:`DeltaBlock`, its timestep embedding, its size
:mod:`hmine.learning.editors`          Δh_t and the block as editors; hooks with an h-dependent delta
:mod:`hmine.learning.losses`           classifier target + leakage, CLIP directional loss, L1, S_dir
:mod:`hmine.learning.train`            the per-step-loss trajectory, training in the one loop
:mod:`hmine.learning.apply`            regenerating samples with an editor at any coefficient
:mod:`hmine.learning.store`            ``learned.zarr`` (directions' schema) and the blocks' files
=====================================  ==========================================================

The stage is :mod:`hmine.stages.learn`. This package imports nothing heavy at its top
level (:mod:`hmine.config` imports its config).
"""
