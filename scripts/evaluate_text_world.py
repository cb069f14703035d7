"""Prompt-following of the text-conditional world model, measured by the embedded world classifier.

    python scripts/evaluate_text_world.py --model stores/train-text [--step 2000] [--n 512]
        [--full 512] [--guidance 4] [--steps 20] [--eta 0] [--json out.json] [--grid out.png] [--device cuda]

``--model`` is an exported model folder (unet/, text_encoder/, tokenizer/, scheduler/) or a
training work dir (its newest checkpoint's EMA weights, or with ``--step`` the EMA
snapshot of that step), so a run can be followed while it trains. For each factor, ``--n``
samples from prompts naming that factor alone; ``--full`` adds prompts naming all six.
See :mod:`hmine.textworld.evaluate` for what "agreement" means per factor.

``--device`` (default: cuda if available, else cpu) is where the model and the classifier
run; the noise is drawn on the CPU, so another device draws the same samples up to its
kernels' rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def load(source: Path, step: int | None, device="cpu"):
    from hmine.textworld.sampling import load_folder
    from hmine.textworld.train import load_work_dir

    if (source / "config.json").is_file() and (source / "tokenizer").is_dir() and not (source / "unet").is_dir():
        return load_work_dir(source, step=step, device=device)
    if step is not None:
        raise SystemExit("--step needs a training work dir, not an exported folder")
    return load_folder(source, device=device), None


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--step", type=int)
    parser.add_argument("--n", type=int, default=512, help="samples per factor")
    parser.add_argument("--full", type=int, default=0, help="samples from prompts naming all six factors")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--eta", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--grid", type=Path, help="also write a grid: one row per word of every factor")
    parser.add_argument("--ceiling", type=int, default=0, help="also score N rendered world images (the classifier's own ceiling)")
    parser.add_argument("--device", help="where the model and the classifier run: cpu, cuda, cuda:N (default: cuda if available, else cpu)")
    args = parser.parse_args(argv)

    import torch

    from hmine.labelling import WorldLabeller
    from hmine.models import resolve_device
    from hmine.textworld.evaluate import classifier_ceiling, evaluate, format_report

    try:
        device = resolve_device(args.device, "--device")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, step = load(args.model, args.step, device)
    labeller = WorldLabeller(device=device)
    result = evaluate(model, args.n, n_full=args.full, guidance_scale=args.guidance, steps=args.steps,
                      eta=args.eta, seed=args.seed, labeller=labeller)
    result["device"] = str(device)
    result["model"] = str(args.model)
    result["training_step"] = step
    print(f"model {args.model}" + (f" (training step {step})" if step is not None else "") + f" on {device}")
    print(format_report(result))
    if args.ceiling:
        result["classifier_ceiling"] = classifier_ceiling(args.ceiling, labeller=labeller)
        print(f"the same measure on {args.ceiling} rendered world images (the classifier's ceiling):")
        for factor, entry in result["classifier_ceiling"].items():
            side = "" if math.isnan(entry["side_agreement"]) else f", side {entry['side_agreement']:.3f}"
            print(f"  {factor:<11} {entry['agreement']:.3f}{side}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(_clean(result), indent=2) + "\n")
    if args.grid:
        from hmine.imaging import write_image_grid
        from hmine.textworld.captions import single_factor_prompts
        from hmine.textworld.sampling import sample

        prompts = [p for _, _, p in single_factor_prompts() for _ in range(8)]
        images = sample(model, prompts, guidance_scale=args.guidance, steps=args.steps, eta=args.eta, seed=args.seed)
        write_image_grid(images, args.grid, columns=8, upscale=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
