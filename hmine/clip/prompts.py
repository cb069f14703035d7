"""The attribute prompt pairs of the CLIP labeller: one (positive, negative) pair per attribute."""

from __future__ import annotations

_PROMPTS_FIX = (
    'give each attribute a pair of prompts, e.g. {"smiling": ("a photo of a smiling person", "a photo of a person")}'
)


def check_prompts(prompts) -> dict[str, tuple[str, str]]:
    """Validate attribute prompt pairs.

    Parameters
    ----------
    prompts : mapping of str to (str, str)
        Attribute name -> (positive prompt, negative prompt).

    Returns
    -------
    dict of str to (str, str)
        The same pairs as tuples, in the given order.

    Raises
    ------
    ValueError
        If there are no attributes, a name is empty, or a value is not two different
        non-empty strings; the message names the attribute and the fix.
    """
    if not isinstance(prompts, dict) or not prompts:
        raise ValueError(f"CLIP prompts are empty or not a dict (got {prompts!r}); {_PROMPTS_FIX}")
    checked = {}
    for attribute, pair in prompts.items():
        if not isinstance(attribute, str) or not attribute.strip():
            raise ValueError(f"CLIP prompt attribute names must be non-empty strings, got {attribute!r}")
        # A bare string is a sequence too; reject it explicitly rather than unpacking characters.
        if isinstance(pair, (str, bytes)) or not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(
                f"CLIP prompts for attribute {attribute!r} must be a pair (positive, negative), got {pair!r}; "
                f"{_PROMPTS_FIX}"
            )
        positive, negative = pair
        if not all(isinstance(p, str) and p.strip() for p in pair):
            raise ValueError(
                f"CLIP prompts for attribute {attribute!r} must be two non-empty strings, got {pair!r}; "
                f"{_PROMPTS_FIX}"
            )
        if positive.strip() == negative.strip():
            # Identical prompts would score exactly 0.5 for every image.
            raise ValueError(
                f"CLIP prompts for attribute {attribute!r} are the same text {positive!r}; "
                "the negative prompt must describe the image without the attribute"
            )
        checked[attribute] = (positive, negative)
    return checked
