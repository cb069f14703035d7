"""The shapes world's attribute classifier, trained by the project (shipped in ``hmine/embedded/shapes-classifier``).

=============================================  ===============================================
module                                         concern
=============================================  ===============================================
:mod:`hmine.world.classifier.network`          the CNN and its heads, the factor scaling
:mod:`hmine.world.classifier.scoring`          the attribute table, evaluation, calibration
:mod:`hmine.world.classifier.persistence`      safetensors + JSON config, no pickle
:mod:`hmine.world.classifier.augmentation`     tint, blur, jitter, noise
:mod:`hmine.world.classifier.training`         its config, batches and loss in the one loop
=============================================  ===============================================

The names below are the classifier's public API.
"""

from hmine.world.classifier.augmentation import augment, degrade, tint_background
from hmine.world.classifier.network import (
    CONTINUOUS,
    DEFAULT_TEMPERATURES,
    FACTOR_RANGES,
    THRESHOLDED_ATTRIBUTES,
    ShapesClassifier,
    count_parameters,
)
from hmine.world.classifier.persistence import CONFIG_FILE, WEIGHTS_FILE, load_classifier, save_classifier
from hmine.world.classifier.scoring import (
    CALIBRATION_SEED,
    EVALUATION_SEED,
    calibrate_temperatures,
    evaluate_classifier,
    predict_attributes,
)
from hmine.world.classifier.training import TRAIN_SEED_STRIDE, ClassifierTrainConfig, train_classifier, training_batch

__all__ = [
    "CALIBRATION_SEED",
    "CONFIG_FILE",
    "CONTINUOUS",
    "DEFAULT_TEMPERATURES",
    "EVALUATION_SEED",
    "FACTOR_RANGES",
    "THRESHOLDED_ATTRIBUTES",
    "TRAIN_SEED_STRIDE",
    "WEIGHTS_FILE",
    "ClassifierTrainConfig",
    "ShapesClassifier",
    "augment",
    "calibrate_temperatures",
    "count_parameters",
    "degrade",
    "evaluate_classifier",
    "load_classifier",
    "predict_attributes",
    "save_classifier",
    "tint_background",
    "train_classifier",
    "training_batch",
]
