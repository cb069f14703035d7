"""Asyrp's automatic editing interval and quality boosting on the embedded world (issue 15, item 4).

    python scripts/edit_interval_figures.py curves             # the distance curves and the chosen t_edit / t_boost
    python scripts/edit_interval_figures.py edit --variant all  # the edit stage in each variant (see VARIANTS)
    python scripts/edit_interval_figures.py table              # flips, leakage and quality per variant (markdown)
    python scripts/edit_interval_figures.py matched --variant V # V's probes at matched strength (hmine.strength)

The run is a demo-like run whose sample, label and directions stages are done (``--run``,
default stores/demo-inversion-figures-1024: configs/demo.yaml's 1,024 samples, its probes).
Each variant is the edit stage of configs/demo.yaml (Asyrp's asymmetric step) on that run's
first ``--n`` samples, with the six probes at ``--scales``, in a run folder of its own under
``--out`` whose samples.zarr, labels.parquet and directions.zarr link to the run's. Every
model call runs at one torch thread.

The table gives, per variant and scale, over the six probes: the far-side flip rate (the
share of samples on the other side of the probe's attribute that the edit moves across its
threshold; ``flip_to_positive`` at positive scales, ``flip_to_negative`` at negative), the
largest share of another attribute's decisions changed (leakage), and the image quality of
:mod:`hmine.quality`: the confident share and the Fréchet distance in the classifier's
features, both to the variant's own scale-0 images (the edit stage's figure: what the edit
changes) and to the stored, unboosted samples (one reference for every variant: how far
the images are from the model's own).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from hmine.config import load_config

PROBES = ["probe/is_circle", "probe/is_red", "probe/is_large", "probe/is_left", "probe/is_top", "probe/is_light_bg"]
VARIANTS = {  # name: overrides of the edit section
    "demo-window": [],  # the demo's hand-set window: every step edited, no boosting
    "demo-window_boost": ["edit.t_boost=auto"],
    "auto-t_edit": ["edit.t_edit=auto"],
    "auto-t_edit_boost": ["edit.t_edit=auto", "edit.t_boost=auto"],
    # boosting of five steps (400 ... 0) instead of the auto one step that adds noise (100)
    "auto-t_edit_boost500": ["edit.t_edit=auto", "edit.t_boost=500"],
}
LINKED = ("samples.zarr", "labels.parquet", "directions.zarr")


def variant_config(args, variant: str):
    settings = [f"name={variant}", f"output_root={args.out}", "sample.torch_threads=1", f"edit.n_samples={args.n}",
                f"edit.scales={json.dumps(args.scales)}", f"edit.directions={json.dumps(PROBES)}", "edit.batch_size=32",
                *VARIANTS[variant]]  # fmt: skip
    return load_config(args.config, settings)


def curves(args) -> None:
    from hmine.interval import resolve_interval
    from hmine.labelling import make_labeller
    from hmine.stages.sample import make_sampler

    config = variant_config(args, "auto-t_edit_boost")
    sampler = make_sampler(config)
    labeller = make_labeller(config.label)
    for distance in ("features", "pixels"):
        edit = config.edit.model_copy(update={"interval": config.edit.interval.model_copy(update={"distance": distance})})
        interval = resolve_interval(sampler, edit, range(edit.interval.n_samples), labeller)
        c = interval.curves
        print(f"{distance}: unit {c.unit:.4g}; t_edit {interval.t_edit} (threshold {edit.interval.edit_threshold}), "
              f"t_boost {interval.t_boost} (threshold {edit.interval.boost_threshold}), "
              f"edited steps {[int(t) for t, e in zip(c.timesteps, interval.edit_steps) if e]}")  # fmt: skip
        print("| t | " + " | ".join(str(int(t)) for t in c.timesteps) + " |")
        print("|---|" + "---|" * len(c.timesteps))
        print("| d(x0, P_t) | " + " | ".join(f"{v:.3f}" for v in c.to_prediction) + " |")
        print("| d(x0, x_t) | " + " | ".join(f"{v:.3f}" for v in c.to_state) + " |")


def edit(args) -> None:
    import time

    from hmine.stages.edit import run_edit_stage
    from hmine.threads import model_threads

    for variant in VARIANTS if args.variant == "all" else [args.variant]:
        config = variant_config(args, variant)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        for name in LINKED:
            link = config.run_dir / name
            if not link.exists():
                link.symlink_to((args.run / name).resolve())
        started = time.perf_counter()
        with model_threads(1):
            run_edit_stage(config, show_progress=False)
        print(f"{variant}: {time.perf_counter() - started:.0f} s", flush=True)


def _far_side(effects: pd.DataFrame) -> pd.DataFrame:
    """Per (direction, scale): the far-side flip rate, the largest other changed decision, quality."""
    rows = []
    for (direction, scale), part in effects[effects["scale"] != 0].groupby(["direction", "scale"]):
        attribute = direction.split("/")[-1]
        own = part[part["attribute"] == attribute].iloc[0]
        others = part[(part["attribute"] != attribute) & part["changed_decision"].notna()]
        rows.append({"direction": direction, "scale": scale,
                     "flips": own["flip_to_positive"] if scale > 0 else own["flip_to_negative"],
                     "leakage": others["changed_decision"].max(), "confident_share": own["confident_share"],
                     "frechet_own": own["frechet_distance"]})  # fmt: skip
    return pd.DataFrame(rows)


def _frechet_to_stored(config, labeller) -> pd.DataFrame:
    """The Fréchet distance of each (direction, scale)'s images to the stored samples' x0."""
    import xarray as xr

    from hmine.quality import FrechetDistance, feature_extractor
    from hmine.stores import open_group

    edits = xr.open_zarr(config.run_dir / "edits.zarr", consolidated=False)
    stored = open_group(config.run_dir / "samples.zarr")["x0"][: config.edit.n_samples]
    frechet = FrechetDistance(feature_extractor(labeller))
    frechet.set_reference(stored)
    rows = []
    for direction in edits["direction"].values:
        for scale in edits["scale"].values:
            images = edits["images"].sel(direction=direction, scale=scale).values
            rows.append({"direction": str(direction), "scale": float(scale), "frechet_stored": frechet.distance(images)})
    return pd.DataFrame(rows)


def table(args) -> None:
    from hmine.labelling import make_labeller
    from hmine.stores import open_group

    labeller, out = None, []
    for variant in VARIANTS:
        config = variant_config(args, variant)
        labeller = labeller or make_labeller(config.label)
        effects = pd.read_parquet(config.run_dir / "edit_effects.parquet")
        measured = _far_side(effects).merge(_frechet_to_stored(config, labeller), on=["direction", "scale"])
        interval = json.loads(open_group(config.run_dir / "edits.zarr").attrs["hmine:edit_interval"])
        zero = _frechet_to_stored(config, labeller).query("scale == 0").iloc[0]
        base = effects[(effects["scale"] == 0)].iloc[0]
        print(f"{variant}: t_edit {interval['t_edit']}, t_boost {interval['t_boost']}; scale 0: confident "
              f"{base['confident_share']:.3f}, Fréchet to stored {zero['frechet_stored']:.3f}")  # fmt: skip
        measured.insert(0, "variant", variant)
        out.append(measured)
    everything = pd.concat(out)
    args.out.mkdir(parents=True, exist_ok=True)
    everything.to_csv(args.out / "figures.csv", index=False)
    summary = everything.groupby(["variant", "scale"], sort=False)[
        ["flips", "leakage", "confident_share", "frechet_own", "frechet_stored"]].mean()  # fmt: skip
    print("\nmeans over the six probes:\n" + _markdown(summary.reset_index(), 3))
    flips = everything.pivot_table(index=["direction", "scale"], columns="variant", values="flips", sort=False)
    print("\nfar-side flips per probe:\n" + _markdown(flips[list(VARIANTS)].reset_index(), 2))


def _markdown(frame: pd.DataFrame, digits: int) -> str:
    """A markdown table (pandas' to_markdown needs tabulate, which the environment lacks)."""
    def cell(value):
        return f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(str(c) for c in frame.columns) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def matched(args) -> None:
    """Each variant's probes at matched strength (hmine.strength: the scale flipping 90 % of the far side)."""
    from hmine.strength import matched_strength

    rows = []
    for variant in VARIANTS if args.variant == "all" else [args.variant]:
        config = variant_config(args, variant)
        table = matched_strength(pd.read_parquet(config.run_dir / "edit_effects.parquet"))
        table = table[["scale", "best_rate", "leak_decision", "confident_share", "frechet_distance"]].reset_index()
        table.insert(0, "variant", variant)
        rows.append(table)
    print(_markdown(pd.concat(rows), 2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("phase", choices=["curves", "edit", "table", "matched"])
    parser.add_argument("--config", default="configs/demo.yaml")
    parser.add_argument("--run", type=Path, default=Path("stores/demo-inversion-figures-1024"))
    parser.add_argument("--out", type=Path, default=Path("stores/edit-interval"))
    parser.add_argument("--variant", default="all", choices=["all", *VARIANTS])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--scales", type=float, nargs="+", default=[-20.0, -10.0, 10.0, 20.0])
    args = parser.parse_args()
    {"curves": curves, "edit": edit, "table": table, "matched": matched}[args.phase](args)


if __name__ == "__main__":
    main()
