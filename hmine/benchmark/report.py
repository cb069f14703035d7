"""The report's benchmark section: heat maps of strength, leakage and quality, the best direction per factor."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pandas as pd

from hmine.benchmark.table import MAX_CONTINUOUS_CHANGE, best_per_attribute
from hmine.strength import LEVEL, MAX_LEAKAGE

# (column, title, colour map, format): one heat map each; rows methods, columns attribute and side
PANELS = (
    ("norm", f"||delta h|| per edited step at {LEVEL:.0%} flips", "viridis", "{:.0f}"),
    ("leak_decision", "largest share of another decision changed", "Reds", "{:.2f}"),
    ("leak_continuous", "largest |change| of a continuous factor (std)", "Reds", "{:.2f}"),
    ("frechet_distance", "Fréchet distance to the unedited images", "magma_r", "{:.1f}"),
    ("margin", f"{LEVEL:.0%} minus the random direction's flip rate at that norm", "Greens", "{:.2f}"),
)


def heat_map_frame(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Rows: methods (random last); columns: ``attribute side``; values: ``column`` where the flip was reached."""
    shown = table.assign(cell=table["attribute"] + " " + table["side"],
                         value=table[column].where(table["reached"]))  # fmt: skip
    frame = shown.pivot_table(index="method", columns="cell", values="value", aggfunc="first", dropna=False)
    methods = sorted(m for m in frame.index if m != "random") + [m for m in frame.index if m == "random"]
    cells = [f"{a} {s}" for a in dict.fromkeys(table["attribute"]) for s in ("-", "+") if f"{a} {s}" in frame.columns]
    return frame.reindex(index=methods, columns=cells)


def write_heat_maps(table: pd.DataFrame, path: Path) -> None:
    """One figure, a heat map per :data:`PANELS` entry; grey cells: 90 % flips not reached (best rate shown)."""
    from hmine.report import _plt

    plt = _plt()
    rates = heat_map_frame(table.assign(reached=True), "best_rate")
    fig, axes = plt.subplots(len(PANELS), 1, figsize=(1.6 + 0.62 * rates.shape[1], 1.0 + len(PANELS) * (0.6 + 0.32 * len(rates))))
    for ax, (column, title, cmap, fmt) in zip(np.atleast_1d(axes), PANELS):
        frame = heat_map_frame(table, column)
        values = frame.to_numpy(dtype=float)
        ax.set_facecolor("#d9d9d9")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, aspect="auto")
        ax.set_xticks(range(frame.shape[1]), frame.columns, rotation=35, ha="right", fontsize=7)
        ax.set_yticks(range(frame.shape[0]), frame.index, fontsize=7)
        ax.set_title(title, fontsize=8)
        for (r, c), v in np.ndenumerate(values):
            text = fmt.format(v) if np.isfinite(v) else f"({rates.iloc[r, c]:.2f})" if np.isfinite(rates.iloc[r, c]) else ""
            dark = np.isfinite(v) and np.dot(image.cmap(image.norm(v))[:3], (0.299, 0.587, 0.114)) < 0.5
            ax.text(c, r, text, ha="center", va="center", fontsize=6, color="white" if dark else "black")
        fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(table: pd.DataFrame) -> pd.DataFrame:
    best = best_per_attribute(table)
    columns = ["attribute", "side", "method", "direction", "reached", "best_rate", "scale", "norm", "leak_decision",
               "leak_continuous", "confident_share", "frechet_distance", "random_rate_at_norm", "clean", "n_samples"]  # fmt: skip
    return best[[c for c in columns if c in best]].set_index(["attribute", "side"])  # n_samples: tables since 2026-12


def margins(table: pd.DataFrame) -> pd.DataFrame:
    """Per method: over the (attribute, side) it reaches, the smallest and median margin over the random baseline."""
    reached = table[(table["method"] != "random") & table["reached"]]
    return reached.groupby("method")["margin"].agg(["count", "min", "median"]).rename(
        columns={"count": "sides reached", "min": "smallest margin", "median": "median margin"}
    )


def benchmark_section(config, run_dir: Path, img: Path) -> str:
    """The report section (a registry ``report_section``)."""
    from hmine.report import _img, _table
    from hmine.stages.benchmark import read_benchmark

    table = read_benchmark(run_dir)
    if table.empty:
        return "<h2>Benchmark stage</h2><p>No direction to benchmark.</p>"
    import shutil

    from hmine.stages.benchmark import SWEEP_FIGURE

    write_heat_maps(table, img / "benchmark.png")
    settings = config.benchmark
    sweep = ""
    if (Path(run_dir) / SWEEP_FIGURE).exists():
        shutil.copy(Path(run_dir) / SWEEP_FIGURE, img / SWEEP_FIGURE)
        sweep = ("<h3>The first sample along every benchmarked direction</h3><p>Rows: directions (PCA components "
                 "unoriented, the random baseline last), columns: scales.</p>" + _img(f"img/{SWEEP_FIGURE}", "benchmark sweep"))
    return (
        "<h2>Benchmark stage</h2><p>Every direction method against the world's known factors: each direction edited "
        f"at &plusmn;{', '.join(f'{s:g}' for s in settings.scales)} std on the first {settings.n_samples} samples; "
        f"per binary attribute and side, the edit strength at which {LEVEL:.0%} of the far side flips (as ||delta h|| "
        "per edited step, comparable across methods), and there the leakage (other decisions changed; continuous "
        "factors' change in std, the attribute's own factor left out), the image quality (Fr&eacute;chet distance "
        "in the classifier's penultimate features, confident share) and the margin over a norm-matched random "
        "direction (its flip rate at the same norm). PCA: the per-step component that moves the attribute most; "
        "jacobian/&lt;variant&gt;: the per-image Jacobian vector that moves it most, each of the Jacobian stage's "
        "analysed samples edited along its own (column n_samples: how many; too few to rank them as best). "
        "Grey cells: not reached, with the best flip rate in brackets.</p>"
        + _img("img/benchmark.png", "benchmark heat maps")
        + f"<h3>Best direction per attribute and side</h3><p>Clean: reached with at most {MAX_LEAKAGE:.0%} of any "
        f"other decision changed and at most {MAX_CONTINUOUS_CHANGE} std change of any other continuous factor.</p>"
        + _table(_summary(table), "{:.2f}")
        + "<h3>Margin over the random baseline</h3>" + _table(margins(table), "{:.2f}")
        + f"<details><summary>the whole table ({len(table)} rows, <code>{html.escape(str(run_dir))}/benchmark.parquet"
        "</code>)</summary>" + _table(table.drop(columns=[c for c in table.columns if ":" in c]), "{:.3f}") + "</details>"
        + sweep
    )
