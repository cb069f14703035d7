"""SEGA concept edits against h-space directions on configs/text-demo.yaml (issue 18's done-means figure).

Reads a finished run of ``configs/text-demo.yaml`` (its ``edit_effects.parquet``) and, for
colour (``is_red``) and shape (``is_circle``), puts each h-space direction and the SEGA
concept of the same attribute side by side:

* at matched strength (:func:`hmine.strength.matched_strength`): the scale at which the
  intended decision flips in ``--level`` of the far-side samples (default 90 %, and 50 %
  beside it), and the leakage there — the largest share of another attribute's decisions
  that changed (``leak_decision``) and the largest |mean change| of another attribute's score
  in stds (``leak_std``); "not reached" with the best flip rate when no scale gets there;
* a figure of flip rate against leakage at every edited scale (rows colour and shape,
  columns the negative and positive sides), one curve per method: at an equal flip rate the
  lower curve leaks less.

Prints Markdown tables and writes ``<out>/text-demo-strength.png``, copies the probe's and
SEGA's strips to ``<out>/`` and records the sha256 of the U-Net weights the run used.

    .venv/bin/python scripts/text_demo_figures.py --run stores/text-demo --out docs/text-demo
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.learning.store import file_sha256  # the learn stage's file digest, reused

ATTRIBUTES = {"is_red": "colour", "is_circle": "shape"}
OTHER = {"is_red": "is_circle", "is_circle": "is_red"}
SIDES = {"-": "flip_to_negative", "+": "flip_to_positive"}


def markdown(table: pd.DataFrame) -> str:
    """A Markdown table (pandas' to_markdown needs tabulate, which hmine does not install)."""
    cells = [[f"{v:.2f}" if isinstance(v, float) else str(v).replace("|", "\\|") for v in row]
             for row in table.itertuples(index=False)]
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in cells])


def method_of(direction: str) -> str:
    if direction.startswith("sega/"):
        return "SEGA"
    if direction.startswith("conditional/"):
        return "conditional mean difference"
    return direction.split("/")[0]


def curves(effects: pd.DataFrame) -> pd.DataFrame:
    """Per (direction, edited scale): the far-side flip rate of its own attribute and the leakage."""
    rows = []
    for (direction, scale), group in effects[effects["scale"] != 0].groupby(["direction", "scale"]):
        attribute = str(direction).split("/")[-1].split("|")[0]
        if attribute not in ATTRIBUTES:
            continue
        by_attribute = group.set_index("attribute")
        others = by_attribute.drop(index=attribute)
        side = "+" if scale > 0 else "-"
        rows.append({
            "direction": direction, "method": method_of(str(direction)), "attribute": attribute, "side": side,
            "scale": float(scale), "flip": float(by_attribute.loc[attribute, SIDES[side]]),
            "leak_decision": float(others["changed_decision"].max()),
            "leak_std": float(others["mean_change_std"].abs().max()),
            f"changed:{OTHER[attribute]}": float(by_attribute.loc[OTHER[attribute], "changed_decision"]),
        })
    return pd.DataFrame(rows)


def strength_table(effects: pd.DataFrame, attributes: list[str], level: float) -> pd.DataFrame:
    from hmine.strength import matched_strength

    table = matched_strength(effects, attributes, level=level).reset_index()
    table = table[table["attribute"].isin(list(ATTRIBUTES))]
    shown = pd.DataFrame({
        "attribute": table["attribute"].map(lambda a: f"{ATTRIBUTES[a]} ({a})"),
        "method": table["direction"].map(method_of),
        "direction": table["direction"],
        "side": table["side"],
        "matched scale": [
            f"{row.scale:+.1f}" if row.reached else f"not reached (best {row.best_rate:.2f} up to {row.largest_scale:+g})"
            for row in table.itertuples()
        ],
        "max changed decision (others)": table["leak_decision"].round(2),
        "max abs change / std (others)": table["leak_std"].round(2),
        "changed decision of the other factor": table.apply(
            lambda row: round(row.get(f"changed_decision:{OTHER[row['attribute']]}", np.nan), 2), axis=1
        ),
    })
    return shown.sort_values(["attribute", "side", "method"]).reset_index(drop=True)


def plot(curve: pd.DataFrame, path: Path, level: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(10, 8), sharex=True, sharey=True)
    styles = {"probe": "o-", "conditional mean difference": "s-", "SEGA": "^--"}
    for r, attribute in enumerate(ATTRIBUTES):
        for c, side in enumerate(SIDES):
            ax = axes[r, c]
            part = curve[(curve["attribute"] == attribute) & (curve["side"] == side)]
            for method, rows in part.groupby("method"):
                rows = rows.assign(size=rows["scale"].abs()).sort_values("size")
                ax.plot([0, *rows["leak_decision"]], [0, *rows["flip"]], styles.get(method, "x-"), label=method)
                for row in rows.itertuples():
                    ax.annotate(f"{row.scale:+g}", (row.leak_decision, row.flip), fontsize=7,
                                textcoords="offset points", xytext=(3, 3))
            ax.axhline(level, color="grey", lw=0.8, ls=":")
            ax.set_title(f"{ATTRIBUTES[attribute]} ({attribute}), side {side}")
            ax.set_xlim(-0.02, 1.02)
            ax.set_ylim(-0.02, 1.02)
            if r == 1:
                ax.set_xlabel("leakage: max share of another attribute's decisions changed")
            if c == 0:
                ax.set_ylabel("far-side flip rate of the own attribute")
            ax.legend(fontsize=8, loc="best")
    fig.suptitle("SEGA concepts vs h-space directions on configs/text-demo.yaml (labels: edit scale)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("stores/text-demo"))
    parser.add_argument("--config", type=Path, default=Path("configs/text-demo.yaml"))
    parser.add_argument("--out", type=Path, default=Path("docs/text-demo"))
    parser.add_argument("--level", type=float, default=0.9)
    args = parser.parse_args()

    from hmine.config import load_config
    from hmine.stages.edit import effects_measured_from, strip_filename

    config = load_config(args.config)
    if not effects_measured_from(args.run / "edits.zarr"):
        raise SystemExit(f"{args.run}/edit_effects.parquet is not the table of its edits.zarr; finish the run first")
    effects = pd.read_parquet(args.run / "edit_effects.parquet")
    args.out.mkdir(parents=True, exist_ok=True)
    weights = Path(config.model.id) / "unet" / "diffusion_pytorch_model.safetensors"
    print(f"U-Net weights now: sha256 {file_sha256(weights)} ({weights})\n")
    attributes = list(config.label.attributes)
    for level in sorted({args.level, 0.5}, reverse=True):
        print(f"### Matched strength: {level:.0%} of the far side flipped\n")
        print(markdown(strength_table(effects, attributes, level)), "\n")
    curve = curves(effects)
    print("### Flip rate and leakage at every edited scale\n")
    shown = curve.drop(columns="direction").sort_values(["attribute", "method", "scale"]).round(2)
    print(markdown(shown), "\n")
    plot(curve, args.out / "text-demo-strength.png", args.level)
    shown_strips = sorted(curve[curve["method"].isin(["probe", "SEGA"])]["direction"].unique())
    for name in shown_strips:  # the probe's and SEGA's strips of each attribute
        shutil.copy(args.run / "edit_strips" / strip_filename(name), args.out / strip_filename(name))
    print(f"wrote {args.out / 'text-demo-strength.png'} and {len(shown_strips)} strips to {args.out}")


if __name__ == "__main__":
    main()
