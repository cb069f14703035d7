"""Export the EMA weights of a DDPM training work dir's newest checkpoint into the package (diffusers layout).

    python scripts/export_embedded_ddpm.py WORK_DIR [--to hmine/embedded/shapes-ddpm]
"""

import argparse
import sys
from pathlib import Path

import json

from hmine.world.ddpm import DDPMTrainConfig, build_scheduler, build_unet, export_ddpm
from hmine.world.training import checkpoint_weights, latest_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("work_dir", type=Path)
    parser.add_argument("--to", type=Path, default=Path("hmine/embedded/shapes-ddpm"))
    args = parser.parse_args()
    config = DDPMTrainConfig.model_validate_json((args.work_dir / "config.json").read_text())
    unet = build_unet(config)
    unet.load_state_dict(checkpoint_weights(args.work_dir, "ema"))
    step = json.loads((latest_checkpoint(args.work_dir) / "state.json").read_text())["step"]
    export_ddpm(unet.eval(), build_scheduler(config), args.to)
    print(f"exported the EMA weights of step {step} to {args.to}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
