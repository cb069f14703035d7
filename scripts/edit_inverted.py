"""Edit your own (inverted) images with a directions store: a strip PNG, rows images, columns scales.

    hmine invert my.yaml
    .venv/bin/python scripts/edit_inverted.py my.yaml --directions stores/demo/directions.zarr \
        --direction probe/is_red --scales -20 -10 0 10 20 --n 6 --out red.png

The run's ``edit:`` section gives t_edit / t_edit_max and the asymmetric step (``--symmetric``
overrides it). The directions must come from the same model, h position and number of steps.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the run config with its images: section (already inverted)")
    parser.add_argument("--directions", type=Path, required=True, help="a directions.zarr")
    parser.add_argument("--direction", required=True, help="direction name, e.g. probe/is_red")
    parser.add_argument("--scales", type=float, nargs="+", default=[-10.0, 0.0, 10.0])
    parser.add_argument("--n", type=int, default=6, help="the first N inverted images")
    parser.add_argument("--out", type=Path, required=True, help="PNG strip to write")
    parser.add_argument("--symmetric", action="store_true", help="symmetric step even if edit.asymmetric is true")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    from hmine.config import load_config
    from hmine.inversion.edits import edit_run_inversions

    config = load_config(args.config, args.overrides)
    images = edit_run_inversions(config, args.directions, args.direction, args.scales, n=args.n, strip=args.out,
                                 asymmetric=False if args.symmetric else None)
    print(f"{args.out}: {images.shape[1]} images x {images.shape[0]} scales of {args.direction}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
