"""Cheap checks of a run's inputs, before anything is written.

A stage finds a missing model folder, a labeller attribute that does not exist or a
mask of the wrong size only when it reaches it, by which time earlier stages have
written their stores and the run directory its lock and config. :func:`check_run_inputs`
runs the preflight checks the registry lists for the given stages (:mod:`hmine.stages`),
each once, without loading model weights or sampling anything, so that bad input is
refused with nothing written.
"""

from __future__ import annotations

from collections.abc import Iterable

from hmine.config import RunConfig


def check_run_inputs(config: RunConfig, stages: Iterable[str]) -> None:
    """Refuse (FileNotFoundError / ValueError, message naming the field and the fix) bad
    inputs of the given stages: the model folder, the labeller's attributes, mask files."""
    from hmine.stages import get

    done = []
    for name in stages:
        for check in get(name).preflight:
            if check not in done:
                check(config)
                done.append(check)
