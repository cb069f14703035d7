"""Saving and loading the shapes-world classifier: safetensors beside a JSON config, no pickle."""

from __future__ import annotations

import json
import os
from pathlib import Path

from hmine.world.classifier.network import ARCHITECTURE, ShapesClassifier

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def save_classifier(model: ShapesClassifier, directory: Path) -> Path:
    """Write ``config.json`` and ``model.safetensors`` into ``directory`` (created if needed).

    Both files are written to temporary names first and renamed, so a crash never leaves
    a half-written file under the final name. Returns the directory.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights_tmp = directory / (WEIGHTS_FILE + ".tmp")
    config_tmp = directory / (CONFIG_FILE + ".tmp")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights_tmp), metadata={"format": "pt", "architecture": ARCHITECTURE})
    config_tmp.write_text(json.dumps(model.config, indent=2) + "\n")
    os.replace(weights_tmp, directory / WEIGHTS_FILE)
    os.replace(config_tmp, directory / CONFIG_FILE)
    return directory


def load_classifier(directory: Path) -> ShapesClassifier:
    """Load a classifier written by :func:`save_classifier` (safetensors, no pickle).

    Returns
    -------
    ShapesClassifier
        In eval mode, gradients off, on the CPU.

    Raises
    ------
    FileNotFoundError
        The folder, its ``config.json`` or its ``model.safetensors`` is missing.
    ValueError
        ``config.json`` or the weights are corrupt or don't match each other.
    """
    from safetensors.torch import load_file

    directory = Path(directory)
    fix = (
        "point label.classifier_path at a folder written by hmine.world.classifier.save_classifier "
        "(e.g. `hmine train-embedded classifier configs/embedded-classifier.yaml --work-dir ... "
        "--export-dir ...`), or leave it unset for the embedded one"
    )
    if not directory.is_dir():
        raise FileNotFoundError(f"classifier folder {directory} does not exist; {fix}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"classifier folder {directory} has no {name}; {fix}")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        if not isinstance(config, dict):
            raise ValueError(f"expected a JSON object, got {type(config).__name__}")
        model = ShapesClassifier.from_config(config)
    except (ValueError, TypeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"classifier config {directory / CONFIG_FILE} is corrupt ({error}); re-export the classifier") from error
    try:
        model.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    except Exception as error:  # safetensors raises its own error type for damaged files
        raise ValueError(
            f"classifier weights {directory / WEIGHTS_FILE} are corrupt or don't match {CONFIG_FILE} ({error}); "
            "re-export the classifier"
        ) from error
    return model.eval().requires_grad_(False)
