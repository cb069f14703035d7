"""What identifies a stage's inputs besides its settings: model weights and revisions, hashes.

A local or embedded model has no revision, so its weight files identify it; a hub model
is identified by its revision. The stage hashes (``hmine.stages``) are built from these.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hmine.config import LabelConfig


@functools.lru_cache(maxsize=64)
def _files_digest(paths: tuple[str, ...], stamps: tuple[tuple[int, int], ...]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


#: Weight files, and the configuration and tokenizer files that change what the same weights
#: compute (a scheduler's ``clip_sample`` or ``prediction_type``, a classifier's thresholds).
#: Model cards and sample images are left out: editing them changes no result.
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt")
IDENTITY_SUFFIXES = (*WEIGHT_SUFFIXES, ".json", ".txt")


def _identifies(relative: Path) -> bool:
    """Weight files anywhere; config and tokenizer files where diffusers and transformers put
    them, in the folder or a component's subfolder (``scheduler/scheduler_config.json``), so
    that what a run writes below a model folder (a store's ``zarr.json``) never counts."""
    if relative.suffix in WEIGHT_SUFFIXES:
        return True
    return relative.suffix in IDENTITY_SUFFIXES and len(relative.parts) <= 2 and not relative.parts[0].endswith(".zarr")


def weights_fingerprint(folder: Path) -> str:
    """Content hash of the weight, config and tokenizer files under a local model folder
    ("" if it has no weight files).

    Local and embedded models have no revision, so their files identify them: retraining
    the embedded model, or changing its scheduler config, invalidates stores made before.
    """
    folder = Path(folder)
    found = sorted(p for p in folder.rglob("*") if p.is_file() and _identifies(p.relative_to(folder)))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in found):
        return ""
    files = [str(p) for p in found]
    stamps = tuple((os.stat(f).st_size, os.stat(f).st_mtime_ns) for f in files)
    return _files_digest(tuple(files), stamps)


def model_identity(model_id: str, revision: str | None) -> str:
    """Revision for a hub model, weights fingerprint for a local or embedded one."""
    if model_id.startswith("embedded:"):  # hmine.models (torch) only for the embedded models
        from hmine.models import EMBEDDED_MODELS, embedded_model_path

        if model_id in EMBEDDED_MODELS:
            return weights_fingerprint(embedded_model_path(model_id))
    if Path(model_id).exists():
        return weights_fingerprint(Path(model_id))
    return revision or "main"


def labeller_identity(label: "LabelConfig") -> str:
    """Revision or weights fingerprint of the labeller's model (part of the label stage's hash)."""
    if label.labeller == "clip":
        return model_identity(label.clip_model_id, label.clip_revision)
    if label.classifier_path is not None:
        return weights_fingerprint(label.classifier_path)
    from hmine.labelling import embedded_classifier_path

    return weights_fingerprint(embedded_classifier_path())


def config_hash(payload: dict) -> str:
    """A short, stable hash of a JSON-able dict (sorted keys)."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]
