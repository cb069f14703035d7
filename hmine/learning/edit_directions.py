"""The learn stage's results as edit directions: names, checks and what the edit stage applies.

``edit.directions`` can name

* ``learned/<target>`` — the trained Δh_t, and ``learned-block-mean/<target>`` — the delta
  block's mean edit: global directions of ``learned.zarr``, applied like any direction,
  with the edit stage's scales as coefficients of the trained edit (scale 1 is the trained
  Δh_t, :func:`hmine.learning.store.learned_delta`);
* ``learned-block/<target>`` — the delta block applied as a function of h, h + c f_t(h, t),
  at coefficients c = the edit stage's scales (:func:`hmine.learning.apply.regenerate_learned`).
"""

from __future__ import annotations

from hmine.edit_names import term_names

LEARNED_PREFIX = "learned/"  # the same names as hmine.learning.store's, which imports torch
BLOCK_MEAN_PREFIX = "learned-block-mean/"
BLOCK_PREFIX = "learned-block/"
PREFIXES = (LEARNED_PREFIX, BLOCK_MEAN_PREFIX, BLOCK_PREFIX)


def learned_prefix(name: str) -> str | None:
    """The learned-direction prefix ``name`` starts with, or None."""
    return next((p for p in PREFIXES if name.startswith(p)), None)


def check_learned_edits(config) -> None:
    """Preflight: each learned name in ``edit.directions`` names a configured target and kind,
    and the edited samples are not the learn stage's training samples (its last ``learn.n_train``)."""
    _check_held_out(config)
    targets = [t.name for t in config.learn.targets]
    for name in term_names(config.edit.directions):  # in combinations too (hmine.edit_names)
        prefix = learned_prefix(name)
        if prefix is None:
            continue
        target = name[len(prefix) :]
        if target not in targets:
            have = f"it has {targets}" if targets else "learn.targets is empty"
            raise ValueError(f"edit.directions names {name!r}, but learn.targets has no target {target!r} ({have}); "
                             "add it to learn.targets or drop the name")  # fmt: skip
        kind = "delta_h" if prefix == LEARNED_PREFIX else "delta_block"
        if not getattr(config.learn, kind):
            raise ValueError(f"edit.directions names {name!r}, but learn.{kind} is false; set it to true")
        if prefix == BLOCK_PREFIX and config.edit.source == "inversions":
            raise ValueError(f"edit.directions names {name!r}, but a delta block is applied to samples only; "
                             "use edit.source: samples or learned-block-mean/" + target)  # fmt: skip


def _check_held_out(config) -> None:
    """The edit stage edits the first ``edit.n_samples`` samples, the learn stage trains on the last
    ``learn.n_train``: a learned edit measured on its own training samples would flatter it."""
    if config.edit.source != "samples" or not any(learned_prefix(n) for n in term_names(config.edit.directions)):
        return
    edited, train, total = config.edit.n_samples, config.learn.n_train, config.sample.n_samples
    if edited + train > total:
        raise ValueError(f"edit.n_samples ({edited}) + learn.n_train ({train}) is above sample.n_samples ({total}): "
                         "the learned edits would be measured on their own training samples; lower one of them "
                         "or raise sample.n_samples")  # fmt: skip


def open_learned_for_edits(config):
    """The learn stage's ``learned.zarr`` (a Dataset) when ``edit.directions`` names learned edits, else None."""
    from hmine.stages.learn import learned_path
    from hmine.stores import store_state

    if not any(learned_prefix(n) for n in term_names(config.edit.directions)):
        return None
    check_learned_edits(config)
    path = learned_path(config)
    if store_state(path) != "complete":
        raise FileNotFoundError(f"edit.directions names learned edits, but {path} is not complete; run the learn "
                                "stage first (hmine run does, before the edit stage)")  # fmt: skip
    from hmine.directions import open_directions

    return open_directions(path)


def learned_unit(learned, name: str):
    """(unit, scale unit) of a global learned direction, so that scale c gives c times the trained edit."""
    from hmine.directions import direction_by_name

    selected = direction_by_name(learned, name)
    return selected["direction"].values, selected["learned_scale"].values * selected["scale_unit"].values


def block_editor_for(config, name: str, timesteps):
    """The delta block editor of ``learned-block/<target>``, checked against the sampler's
    timesteps and against the sha256 that ``learned.zarr`` records for its file."""
    import json

    from hmine.learning.store import file_sha256, load_block_editor
    from hmine.stages.learn import block_path, learned_path
    from hmine.stores import open_group

    target = name[len(BLOCK_PREFIX) :]
    path = block_path(config, target)
    recorded = json.loads(open_group(learned_path(config)).attrs.get("hmine:delta_blocks", "{}")).get(target)
    if recorded is None:
        raise ValueError(f"{learned_path(config)} records no delta block for {target!r}; run the learn stage "
                         "(`hmine learn`) with learn.delta_block: true")  # fmt: skip
    if path.is_file() and file_sha256(path) != recorded["sha256"]:
        raise ValueError(f"{path} is not the delta block learned.zarr records (sha256 {recorded['sha256'][:12]}...); "
                         "run the learn stage again (`hmine learn`) to rewrite it")  # fmt: skip
    return load_block_editor(path, [int(t) for t in timesteps])
