"""Zero-shot attribute scores with CLIP: one (positive, negative) prompt pair per attribute.

For an image ``I`` and an attribute with prompts ``(P, N)`` the score is CLIP's softmax over
the pair,

    score = exp(s * cos(I, P)) / (exp(s * cos(I, P)) + exp(s * cos(I, N))),

with ``s = logit_scale.exp()``: the probability CLIP gives the positive prompt when it must
choose between the two. Scores lie in [0, 1] like every other labeller's binary attributes
(:mod:`hmine.labelling`), so a direction's effect reads as a change in probability, e.g.
``"smiling": ("a photo of a smiling person", "a photo of a person")``.

================================  ===========================================================
module                            concern
================================  ===========================================================
:mod:`hmine.clip.prompts`         checking the attribute prompt pairs
:mod:`hmine.clip.preprocessing`   the checkpoint's image processor, done with torch
:mod:`hmine.clip.loading`         loading the model, tokenizer and processor settings
                                  (safetensors only), with errors that say what to do
:mod:`hmine.clip.labeller`        :class:`ClipLabeller`: encoding prompts, scoring images
================================  ===========================================================
"""

from hmine.clip.labeller import ClipLabeller
from hmine.clip.preprocessing import CLIP_MEAN, CLIP_STD, PROCESSOR_CONFIG, ImagePreprocessing, center_crop
from hmine.clip.prompts import check_prompts

__all__ = ["CLIP_MEAN", "CLIP_STD", "PROCESSOR_CONFIG", "ClipLabeller", "ImagePreprocessing", "center_crop", "check_prompts"]
