"""Export the EMA weights of a DDPM training checkpoint into the package (diffusers layout).

    python scripts/export_embedded_ddpm.py WORK_DIR [--to hmine/embedded/shapes-ddpm]
"""

import argparse
import sys
from pathlib import Path

import torch

from hmine.training import DDPMTrainConfig, build_scheduler, build_unet, export_ddpm


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--to", type=Path, default=Path("hmine/embedded/shapes-ddpm"))
    args = parser.parse_args()
    config = DDPMTrainConfig.model_validate_json((args.work_dir / "config.json").read_text())
    state = torch.load(args.work_dir / "checkpoint.pt", weights_only=True)
    unet = build_unet(config)
    unet.load_state_dict(state["ema"])
    export_ddpm(unet.eval(), build_scheduler(config), args.to)
    print(f"exported the EMA weights of step {int(state['step'])} to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
