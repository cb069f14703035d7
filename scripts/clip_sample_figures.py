"""Prompt-following of the embedded text model with its scheduler's ``clip_sample`` on and off.

    nice -n 10 env OMP_NUM_THREADS=1 python scripts/clip_sample_figures.py --n 128 [--json out.json]
        [--clip-sample true false] [--factors size color ...]
    python scripts/clip_sample_figures.py --markdown a.json b.json   # the tables of runs merged

For each factor (:func:`hmine.textworld.evaluate.single_factor_plan`: prompts naming that
factor alone, its words in turn) the same seeds are sampled by both of the project's samplers,
once with the shipped folder and once with a copy whose ``scheduler_config.json`` has
``clip_sample: false`` (nothing else differs), and the embedded world classifier's agreement
with the named word is counted (:func:`hmine.textworld.evaluate.agreement`):

* ``textworld``: :func:`hmine.textworld.sampling.sample` (the model card's evaluation: DDIM,
  ``--steps`` 20, guidance 4, eta 0; it re-derives the noise from the clipped x0, a no-op
  without clipping), factor ``k`` seeded ``k``;
* ``hmine``: :class:`hmine.sampling.Sampler` (the pipeline's sampler, tested equal to diffusers'
  pipelines: the raw model output in DDIM's direction term), ``--hmine-steps`` 10 as
  configs/text-demo.yaml, guidance 4, eta 0, factor ``k``'s sample ``i`` seeded ``k * n + i``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODEL = Path("hmine/embedded/shapes-text-ddpm")
FACTORS = ("size", "color", "shape", "y", "x", "background")  # hmine.textworld.captions.FACTORS


def unclipped_copy(model: Path, into: Path) -> Path:
    """A copy of the model folder whose scheduler does not clip the predicted x0."""
    folder = into / model.name
    shutil.copytree(model, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["clip_sample"] = False
    path.write_text(json.dumps(config, indent=2) + "\n")
    return folder


def summarise(factor: str, word_index, table) -> dict:
    import numpy as np

    from hmine.textworld import captions
    from hmine.textworld.evaluate import agreement

    agree = agreement(table, factor, word_index)["agree"]
    words = {w: float(agree[word_index == i].mean()) for i, w in enumerate(captions.WORDS[factor])}
    return {"agreement": float(np.mean(agree)), "n": len(agree), "words": words}


def hmine_sampler(folder: Path, args):
    """The pipeline's sampler on the folder, conditioned on every evaluation prompt."""
    from hmine.models import load_model
    from hmine.prompts import TextConfig
    from hmine.sampling import Sampler
    from hmine.textworld import captions
    from hmine.textworld.evaluate import single_factor_plan

    prompts = sorted({p for f in captions.FACTORS for _, p in single_factor_plan(f, len(captions.WORDS[f]))})
    text = TextConfig(prompts=prompts, guidance_scale=args.guidance)
    return Sampler(load_model(str(folder)), num_inference_steps=args.hmine_steps, eta=0.0, torch_threads=1, text=text)


def hmine_images(sampler, prompts: list[str], seeds: list[int], batch: int):
    import numpy as np

    images = [
        sampler.sample(seeds[i : i + batch], prompts=prompts[i : i + batch], record_h=False).images.float().numpy()
        for i in range(0, len(seeds), batch)
    ]
    return np.concatenate(images)


def measure(folder: Path, args, result: dict, key: str) -> None:
    """Fill ``result[key]`` factor by factor (written to ``--json`` after each, so a stopped run keeps its factors)."""
    import numpy as np

    from hmine.labelling import WorldLabeller
    from hmine.textworld import captions
    from hmine.textworld.evaluate import single_factor_plan
    from hmine.textworld.sampling import load_folder, sample

    labeller = WorldLabeller()
    model = load_folder(folder)
    sampler = hmine_sampler(folder, args)
    out = result.setdefault(key, {"textworld": {}, "hmine": {}})
    for factor in args.factors:
        k = captions.FACTORS.index(factor)  # the seeds of a factor do not depend on --factors
        plan = single_factor_plan(factor, args.n)
        prompts = [p for _, p in plan]
        word_index = np.array([w for w, _ in plan])
        images = sample(model, prompts, guidance_scale=args.guidance, steps=args.steps, seed=k, batch_size=args.batch)
        out["textworld"][factor] = summarise(factor, word_index, labeller.score(images))
        seeds = [k * args.n + i for i in range(args.n)]
        images = hmine_images(sampler, prompts, seeds, args.batch)
        out["hmine"][factor] = summarise(factor, word_index, labeller.score(images))
        print(key, factor, json.dumps({s: out[s][factor] for s in out}), flush=True)
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")


def markdown(result: dict) -> str:
    """The tables of one result (or of several merged: ``--markdown``); a missing figure is '-'."""

    def fig(entry: dict | None, word: str | None = None) -> str:
        if entry is None:
            return "-"
        return f"{entry['words'][word] if word else entry['agreement']:.2f}"

    lines = []
    for sampler, steps, title in (
        ("textworld", result["steps"], "hmine.textworld.sampling.sample"),
        ("hmine", result["hmine_steps"], "hmine.sampling.Sampler"),
    ):
        lines += [
            f"{title}, {steps} DDIM steps, guidance {result['guidance']}, n = {result['n']} per factor",
            "",
            "| factor | clip_sample true | clip_sample false | per word (true / false) |",
            "|---|---|---|---|",
        ]
        on = result.get("clip_sample_true", {}).get(sampler, {})
        off = result.get("clip_sample_false", {}).get(sampler, {})
        for factor in [f for f in FACTORS if f in on or f in off]:
            a, b = on.get(factor), off.get(factor)
            words = (a or b)["words"]
            per_word = ", ".join(f"{w} {fig(a, w)} / {fig(b, w)}" for w in words)
            lines.append(f"| {factor} | {fig(a)} | {fig(b)} | {per_word} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=MODEL)
    parser.add_argument("--n", type=int, default=128, help="samples per factor")
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps of hmine.textworld.sampling.sample")
    parser.add_argument("--hmine-steps", type=int, default=10, help="DDIM steps of hmine.sampling.Sampler")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--clip-sample", nargs="+", choices=["true", "false"], default=["true", "false"])
    parser.add_argument("--factors", nargs="+", choices=FACTORS, default=list(FACTORS))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--markdown", nargs="+", type=Path, help="print the tables of these --json files, merged")
    args = parser.parse_args(argv)

    if args.markdown:
        merged: dict = {}
        for path in args.markdown:
            part = json.loads(path.read_text())
            for key, value in part.items():
                if key.startswith("clip_sample_"):
                    for sampler, factors in value.items():
                        merged.setdefault(key, {}).setdefault(sampler, {}).update(factors)
                elif merged.setdefault(key, value) != value:
                    raise SystemExit(f"--markdown: {path} has {key} {value}, another file {merged[key]}")
        print(markdown(merged))
        return 0

    import torch

    torch.set_num_threads(1)
    result = {
        "model": str(args.model),
        "n": args.n,
        "guidance": args.guidance,
        "steps": args.steps,
        "hmine_steps": args.hmine_steps,
    }
    with tempfile.TemporaryDirectory() as tmp:
        if "true" in args.clip_sample:
            measure(args.model, args, result, "clip_sample_true")
        if "false" in args.clip_sample:
            measure(unclipped_copy(args.model, Path(tmp)), args, result, "clip_sample_false")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
