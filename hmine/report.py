"""The HTML report of a run: one page that opens offline, images beside it.

``reports/<run>/index.html`` reads only the run's stores and tables, so it can be rebuilt
at any time with ``hmine report CONFIG``. Sections: provenance, sample grid, PCA,
per-attribute probes and edit strips, the attribute-change matrix and the effects at matched
strength (:mod:`hmine.strength`), Jacobian directions.
"""

from __future__ import annotations

import html
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.config import RunConfig
from hmine.imaging import write_image_grid
from hmine.stores import open_group, store_state, table_meta
from hmine.strength import direction_attribute

# a stage whose output is missing or not marked complete is not read: a partial store
# holds fill values where work is missing
NOT_DONE = "Not run (or not complete): run the stage, then the report."



def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _table(frame: pd.DataFrame, float_format: str = "{:.3f}") -> str:
    return frame.to_html(float_format=lambda v: float_format.format(v), border=0, classes="data")


def _img(src: str, alt: str, width: int | None = None) -> str:
    style = f' style="width:{width}px;image-rendering:pixelated"' if width else ' style="image-rendering:pixelated"'
    return f'<img src="{html.escape(src)}" alt="{html.escape(alt)}"{style}>'


def read_run_log(run_dir: Path) -> pd.DataFrame:
    from hmine.pipeline import RUN_LOG, read_log_records

    records = read_log_records(Path(run_dir) / RUN_LOG)
    return pd.DataFrame(records, columns=["stage", "seconds", "computed", "skipped", "cache_hit"])


def attribute_change_matrix(effects: pd.DataFrame, attributes: list[str], scale: float | None = None) -> pd.DataFrame:
    """Rows: directions; columns: attributes; values: mean score change at ``scale``.

    ``scale`` defaults to the largest positive scale edited (Haas et al. Table I reads one
    fixed edit strength).
    """
    if scale is None:
        scale = float(effects.loc[effects["scale"] > 0, "scale"].max())
    chosen = effects[(effects["scale"] == scale) & (effects["attribute"].isin(attributes))]
    matrix = chosen.pivot(index="direction", columns="attribute", values="mean_change")
    return matrix.reindex(columns=[a for a in attributes if a in matrix.columns])


def best_flip_rates(effects: pd.DataFrame) -> pd.DataFrame:
    """Per supervised direction, how often it flips the decision on its own attribute.

    The attribute of a direction is the first one in its name (``probe/is_red``,
    ``conditional/mean_difference/is_circle|is_red`` → is_red, is_circle). At a negative
    scale the rate is ``flip_to_negative`` (positive samples that turn negative), at a
    positive one ``flip_to_positive``. Rows: directions; columns: the attribute, the best
    rate over the scales, the scale that gave it, and the rate at every scale.
    """
    rows = {}
    for name, group in effects[effects["scale"] != 0].groupby("direction", sort=True):
        attribute = direction_attribute(name)
        own = group[group["attribute"] == attribute]
        if own.empty or own[["flip_to_positive", "flip_to_negative"]].isna().all().all():
            continue  # PCA directions, or a continuous attribute: no decision to flip
        rates = pd.Series(
            np.where(own["scale"] > 0, own["flip_to_positive"], own["flip_to_negative"]), index=own["scale"].values
        ).sort_index()
        rows[name] = {"attribute": attribute, "best flip rate": rates.max(), "at scale": rates.idxmax(),
                      **{f"{scale:+g}": rate for scale, rate in rates.items()}}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("direction")


def jacobian_summary(run_dir: Path) -> pd.DataFrame:
    """Per analysed sample: top singular values and, with a mask, how local each top direction is."""
    import xarray as xr

    jac = xr.open_zarr(Path(run_dir) / "jacobian.zarr", consolidated=False)
    frame = pd.DataFrame(index=pd.Index(jac["sample"].values, name="seed"))
    if not len(frame.index):  # jacobian.n_samples: 0 analyses nothing
        return frame
    first = jac.isel(step=0)
    frame["step"] = int(first["step"])
    for k in range(jac.sizes["k"]):
        frame[f"sigma_{k + 1}"] = first["singular_values"].values[:, k]
    measured = all(name in jac for name in ("inside_mask_fraction", "inside_mask_eps_fraction"))
    if measured and np.isfinite(jac["inside_mask_fraction"].values).all():
        frame["mask area"] = jac["mask"].values.mean(axis=(1, 2))
        # stores written before the localised variant hold two unnamed variants
        variants = [str(v) for v in jac["variant"].values] if "variant" in jac.coords else ["masked", "unmasked"]
        for v, variant in enumerate(variants):
            frame[f"eps change inside, {variant}"] = jac["inside_mask_eps_fraction"].values[:, v]
        for v, variant in enumerate(variants):
            frame[f"pixel change inside, {variant}"] = jac["inside_mask_fraction"].values[:, v]
    return frame


def jacobian_strip_paths(run_dir: Path) -> list[Path]:
    """The strips of the samples and first step in ``jacobian.zarr`` that exist (never left-overs
    of an earlier config, which may analyse other samples or steps)."""
    from hmine.localisation import STRIPS_DIR, strip_filename

    group = open_group(Path(run_dir) / "jacobian.zarr")
    if "inside_mask_fraction" not in group or not np.isfinite(group["inside_mask_fraction"][...]).all():
        return []  # no mask, no diagnostic edits: any strips there are an earlier config's
    step = int(group["step"][0])
    paths = [Path(run_dir) / STRIPS_DIR / strip_filename(int(seed), step) for seed in group["sample"][...]]
    return [path for path in paths if path.exists()]


def jacobian_summary_table(run_dir: Path) -> str:
    frame = jacobian_summary(run_dir)
    return (
        "<p>Top singular values of d eps / d h at the first analysed step and, with a mask, the share "
        "inside the mask of the top direction's change of eps at that step (|M J v|&sup2; / |J v|&sup2;, "
        "what the masked objective controls) and of the edit's pixel change in the final image, for "
        "the top direction of the masked Jacobian, of the unmasked one and, where computed, the top "
        "localised direction (the largest share of the change of eps inside the mask, within the top "
        "singular subspace of the unmasked Jacobian).</p>" + _table(frame)
    )


def build_report(config: RunConfig) -> Path:
    """Write ``<report_root>/<name>/index.html`` and its images; return the page's path."""
    run_dir = config.run_dir
    final = config.report_root / config.name
    if final.exists() and not _is_report_dir(final):
        raise ValueError(
            f"{final} holds files that are not an hmine report (report_root/name); "
            "set report_root to a folder of its own, e.g. reports"
        )
    # built beside the old report and swapped in at the end: a report that fails half-way
    # leaves the previous one whole
    _remove_abandoned_builds(final)
    out = final.with_name(f"{BUILDING_PREFIX.format(name=final.name)}{os.getpid()}")
    if out.exists():
        shutil.rmtree(out)
    (out / "img").mkdir(parents=True)
    try:
        _build_sections_into(config, run_dir, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    out.rename(final)
    return final / "index.html"


BUILDING_PREFIX = ".{name}.building-"  # + the builder's PID


def _remove_abandoned_builds(final: Path) -> None:
    """Remove side folders of builds of this report whose process is gone (killed mid-build)."""
    prefix = BUILDING_PREFIX.format(name=final.name)
    if not final.parent.exists():
        return
    for side in final.parent.glob(prefix + "*"):
        pid = side.name[len(prefix):]
        if pid.isdigit() and int(pid) != os.getpid() and not _process_exists(int(pid)):
            shutil.rmtree(side, ignore_errors=True)


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _is_report_dir(path: Path) -> bool:
    """A folder this module wrote: an index.html and an img/ folder, nothing else."""
    return {p.name for p in path.iterdir()} <= {"index.html", "img"}


def stage_heading(name: str) -> str:
    """A stage's heading in the report, e.g. "Sample stage"."""
    return f"{name.capitalize()} stage"


def run_report_stage(config: RunConfig):
    """The report as a stage of the registry: build it, return where it is."""
    import time

    from hmine.stages.sample import StageResult

    started = time.perf_counter()
    return StageResult(build_report(config), 1, 1, 0, 0, time.perf_counter() - started)


def provenance_section(config: RunConfig, run_dir: Path) -> str:
    import xarray as xr

    from hmine.stages import applicable_stage_names

    samples = xr.open_zarr(run_dir / "samples.zarr", consolidated=False)
    log = read_run_log(run_dir)
    import hmine

    prov = [
        f"<p>Run <b>{html.escape(config.name)}</b>, model <code>{html.escape(config.model.id)}</code>, "
        f"h position <code>{config.model.h_position}</code>, {samples.sizes['sample']} samples, "
        f"{samples.sizes['step']} steps, eta {config.sample.eta}. hmine {hmine.__version__}, "
        f"git <code>{html.escape(str(samples.attrs.get('hmine:git_sha', '?'))[:12])}</code>.</p>",
        "<table class='data'><tr><th>stage</th><th>config hash</th></tr>"
        + "".join(f"<tr><td>{s}</td><td><code>{config.stage_hash(s)}</code></td></tr>" for s in applicable_stage_names(config) if s != "report")
        + "</table>",
    ]
    if len(log):
        prov.append("<h3>Stage timings and cache hits (all invocations in this run directory)</h3>")
        computed = log[log["computed"] > 0].groupby("stage").tail(1).set_index("stage")["seconds"]
        summary = log.groupby("stage", sort=False).agg(
            invocations=("stage", "size"), cache_hits=("cache_hit", "sum"), last_seconds=("seconds", "last")
        )
        summary.insert(0, "seconds_when_computed", computed.reindex(summary.index))
        prov.append(_table(summary, "{:.2f}"))
    prov.append(f"<details><summary>config</summary><pre>{html.escape(config.model_dump_json(indent=2))}</pre></details>")
    return "<h2>Provenance</h2>" + "".join(prov)



def sample_section(config: RunConfig, run_dir: Path, img: Path) -> str:
    import xarray as xr

    samples = xr.open_zarr(run_dir / "samples.zarr", consolidated=False)
    n_grid = min(64, samples.sizes["sample"])
    write_image_grid(samples["x0"][:n_grid].values, img / "samples.png", columns=16, upscale=3)
    return "<h2>Sample stage</h2><p>The first samples of the run (seed order).</p>" + _img("img/samples.png", "sample grid")



def label_section(config: RunConfig, run_dir: Path, img: Path) -> str:
    labels = pd.read_parquet(run_dir / "labels.parquet")
    attributes = reported_attributes(config, labels)
    from hmine.labelling import decision_thresholds

    thresholds = pd.Series(decision_thresholds(labels, attributes, config.directions.threshold))
    decisions = labels[attributes].gt(thresholds)
    frac = decisions.mean().to_frame("fraction positive").assign(threshold=thresholds)
    corr = decisions.astype(float).corr()
    return (
        f"<h2>Label stage</h2><p>Labeller <code>{config.label.labeller}</code>; {len(labels)} samples.</p>"
        + _table(frac) + "<h3>Correlation of the binary decisions</h3>" + _table(corr)
    )


def reported_attributes(config: RunConfig, labels: pd.DataFrame | None = None) -> list[str]:
    """The configured attributes the labels hold (as labelled, if the config changed since)."""
    if labels is None:
        meta = table_meta(config.run_dir / "labels.parquet")
        labels = pd.read_parquet(config.run_dir / "labels.parquet") if meta is not None else None
    if labels is None:
        return list(config.label.attributes)
    return [a for a in config.label.attributes if a in labels.columns]


def directions_section(config: RunConfig, run_dir: Path, img: Path) -> str:
    plt = _plt()
    directions_file = run_dir / "directions.zarr"
    from hmine.directions import open_directions

    directions = open_directions(directions_file)
    methods = directions["method"].values.astype(str)
    steps = directions["step"].values
    parts = []
    pca = directions.isel(direction=methods == "pca")
    if pca.sizes["direction"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        evr = pca["explained_variance_ratio"].values
        for c in range(evr.shape[0]):
            ax.plot(steps, evr[c], marker="o", label=f"PC {c}")
        ax.set_xlabel("timestep")
        ax.set_ylabel("explained variance ratio")
        ax.invert_xaxis()
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(img / "pca_evr.png", dpi=110)
        plt.close(fig)
        parts.append("<h3>PCA: explained variance per timestep</h3>" + _img("img/pca_evr.png", "PCA explained variance"))
    probe = directions.isel(direction=methods == "probe")
    if probe.sizes["direction"]:
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for i, name in enumerate(probe["attribute"].values.astype(str)):
            ax.plot(steps, probe["probe_accuracy"].values[i], marker="o", label=name)
        ax.set_xlabel("timestep")
        ax.set_ylabel("held-out probe accuracy")
        ax.invert_xaxis()
        ax.set_ylim(0.4, 1.01)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(img / "probe_acc.png", dpi=110)
        plt.close(fig)
        parts.append("<h3>Linear probes: held-out accuracy per timestep</h3>" + _img("img/probe_acc.png", "probe accuracy"))
    return "<h2>Directions stage</h2>" + "".join(parts)


def edit_section(config: RunConfig, run_dir: Path, img: Path) -> str:
    plt = _plt()
    attributes = reported_attributes(config)
    effects_file = run_dir / "edit_effects.parquet"
    strips_dir = run_dir / "edit_strips"
    effects = pd.read_parquet(effects_file)
    noun = edited_noun(config)
    parts = [edited_images_html(config)]
    matrix = attribute_change_matrix(effects, attributes)
    if len(matrix):
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * matrix.shape[1], 0.9 + 0.4 * matrix.shape[0]))
        im = ax.imshow(matrix.values, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
        ax.set_xticks(range(matrix.shape[1]), matrix.columns, rotation=30, ha="right", fontsize=8)
        ax.set_yticks(range(matrix.shape[0]), matrix.index, fontsize=7)
        for (r, c), v in np.ndenumerate(matrix.values):
            ax.text(c, r, f"{v:+.2f}", ha="center", va="center", fontsize=6)
        fig.colorbar(im, ax=ax, fraction=0.04)
        fig.tight_layout()
        fig.savefig(img / "attribute_change.png", dpi=110)
        plt.close(fig)
        scale = float(effects.loc[effects["scale"] > 0, "scale"].max())
        parts.append(
            f"<h3>Attribute-change matrix (scale {scale:+g})</h3><p>Mean change of each attribute score "
            "when a direction is applied; the intended attribute is the diagonal, the rest is leakage.</p>"
            + _img("img/attribute_change.png", "attribute change matrix") + _table(matrix, "{:+.3f}")
        )
    parts.append(matched_strength_html(effects, attributes, noun))
    from hmine.sweeps import edit_sweep_html
    from hmine.text_effects import s_dir_html

    parts.append(s_dir_html(effects))  # text-driven edits only
    parts.append(edit_sweep_html(run_dir, img, noun[:-1]))
    flips = best_flip_rates(effects)
    if len(flips):
        step_rule = "Asyrp's asymmetric step" if config.edit.asymmetric else "the symmetric step"
        parts.append(
            f"<h3>Decision flips</h3><p>For each supervised direction, the share of edited {noun} on the "
            "far side of its own attribute whose decision (score &gt; threshold) flips: at negative scales "
            f"positive ones turning negative, at positive scales the reverse. Edits use {step_rule}.</p>"
            + _table(flips, "{:.2f}")
        )
    for attribute in attributes:
        shown = []
        for name in sorted(effects["direction"].unique()):
            if attribute != direction_attribute(name):
                continue
            from hmine.stages.edit import strip_filename

            src = strips_dir / strip_filename(name)
            if src.exists():
                shutil.copy(src, img / src.name)
                shown.append(f"<figure>{_img('img/' + src.name, name, 260)}<figcaption>{html.escape(name)}</figcaption></figure>")
        if shown:
            parts.append(
                f"<h3>Edits for {html.escape(attribute)} (rows: {noun}, columns: scales low to high)</h3>"
                f"<div class='row'>{''.join(shown)}</div>"
            )
    from hmine.per_image import JACOBIAN_PREFIX
    from hmine.stages.edit import strip_filename

    shown = []
    for name in sorted(n for n in effects["direction"].unique() if n.startswith(JACOBIAN_PREFIX)):
        src = strips_dir / strip_filename(name)
        if src.exists():
            shutil.copy(src, img / src.name)
            shown.append(f"<figure>{_img('img/' + src.name, name, 260)}<figcaption>{html.escape(name)}</figcaption></figure>")
    if shown:
        parts.append(
            "<h3>Edits along per-image Jacobian directions (columns: scales low to high)</h3><p>Each "
            "analysed sample along its own direction; <code>@t</code>: that step's vector at every step, "
            "otherwise each analysed step's vector at its step.</p><div class='row'>" + "".join(shown) + "</div>"
        )
    return "<h2>Edit stage</h2>" + "".join(parts)


def edited_noun(config: RunConfig) -> str:
    """What the edit stage edited, in the report's words: "samples" or "inverted images"."""
    return "inverted images" if config.edit.source == "inversions" else "samples"


def edited_images_html(config: RunConfig) -> str:
    """With ``edit.source: inversions``, which images were edited and how they were inverted; else ''."""
    if config.edit.source != "inversions":
        return ""
    invert, steps = config.invert, config.sample.num_inference_steps
    if invert.method == "edit_friendly":
        method = f"edit-friendly DDPM inversion (Huberman-Spiegelglas et al., eta {invert.eta:g}, per-step noise maps)"
    else:
        method = f"DDIM inversion (eta 0, {invert.refine} refinements per step)"
    return (
        f"<p>Edited: the first {config.edit.n_samples} inverted images of <code>inversions.zarr</code> (given images, "
        f"not samples), inverted with {method} at {steps} steps and regenerated with each direction added; "
        "scale 0 is the regenerated, unedited image.</p>"
    )


def matched_strength_html(effects: pd.DataFrame, attributes: list[str], noun: str = "samples") -> str:
    """The edit section's matched-strength table (:mod:`hmine.strength`), beside the fixed-scale matrix;
    ``noun`` names what was edited (:func:`edited_noun`)."""
    from hmine.strength import (
        LEVEL,
        MAX_LEAKAGE,
        matched_strength,
        matched_strength_display,
    )

    table = matched_strength(effects, attributes)
    if table.empty:
        return ""
    shown = matched_strength_display(table)
    clean = int((shown["clean"] == "yes").sum())
    return (
        f"<h3>Effects at matched strength ({LEVEL:.0%} flips)</h3><p>For each supervised direction and side, the "
        f"smallest |scale| at which its own decision flips in {LEVEL:.0%} of the edited {noun} on the far side "
        "(linear interpolation between the edited scales, scale 0 counting as no flip; <i>not reached</i> when no "
        f"edited scale gets there), and the leakage at that scale: the share of edited {noun} whose other "
        "decisions change (largest, then per attribute) and the largest mean change of another score in stds of "
        "its unedited scores; and the image quality there: the share of edited images the classifier still scores "
        "confidently (largest class probability &ge; 0.9 on every class head) and the Fr&eacute;chet distance of the "
        "edited to the unedited images in the labeller's feature space (hmine.quality). "
        f"<i>Clean</i>: reached with at most {MAX_LEAKAGE:.0%} of any other decision "
        f"changed; {clean} of {len(shown)} direction-sides are.</p>" + _table(shown, "{:.2f}")
    )


def jacobian_section(config: RunConfig, run_dir: Path, img: Path) -> str:
    if config.jacobian.n_samples == 0:
        return "<h2>Jacobian stage</h2><p>Switched off: <code>jacobian.n_samples</code> is 0.</p>"
    shown = []
    for src in jacobian_strip_paths(run_dir):
        shutil.copy(src, img / ("jac-" + src.name))
        shown.append(f"<figure>{_img('img/jac-' + src.name, src.stem, 260)}<figcaption>{html.escape(src.stem)}</figcaption></figure>")
    return (
        f"<h2>Jacobian stage</h2><p>Mask: <code>{config.jacobian.mask}</code>; edits applied at "
        f"<code>{config.jacobian.edit_window}</code>. Each strip: mask, then the edit at the configured "
        "scales along the masked Jacobian's top direction and, in a second row where computed, along the "
        "top localised direction.</p><div class='row'>" + "".join(shown) + "</div>"
        + jacobian_summary_table(run_dir)
    )

def _build_sections_into(config: RunConfig, run_dir: Path, out: Path) -> None:
    import importlib

    from hmine.stages import is_complete, stage_applies, stages

    if store_state(run_dir / "samples.zarr") != "complete":
        raise FileNotFoundError(f"{run_dir / 'samples.zarr'} is not complete; run the sample stage first")
    sections = [provenance_section(config, run_dir)]
    for stage in stages():
        if stage.output is None or not stage_applies(config, stage.name):
            continue
        if not is_complete(config, stage.name):
            sections.append(f"<h2>{stage_heading(stage.name)}</h2><p>{NOT_DONE}</p>")
        elif stage.report_section is None:
            sections.append(f"<h2>{stage_heading(stage.name)}</h2><p>{html.escape(stage.summary)}: "
                            f"<code>{html.escape(stage.output)}</code>.</p>")
        else:
            module, function = stage.report_section.split(":")
            sections.append(getattr(importlib.import_module(module), function)(config, run_dir, out / "img"))

    page = f"""<!doctype html>
<html><head><meta charset="utf-8"><title>hmine report: {html.escape(config.name)}</title>
<style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 1em auto; color: #222; }}
table.data {{ border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }}
table.data td, table.data th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
.row {{ display: flex; flex-wrap: wrap; gap: 12px; }}
figure {{ margin: 0; }} figcaption {{ font-size: 0.75em; }}
img {{ max-width: 100%; height: auto; }}
</style></head><body>
<h1>hmine report: {html.escape(config.name)}</h1>
{''.join(f'<section>{s}</section>' for s in sections)}
</body></html>
"""
    (out / "index.html").write_text(page)
