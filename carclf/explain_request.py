"""What a client may ask of an explanation: the method and the target class, checked without torch.

The serving ingress checks an explain request with these before it spends an explainer's slot,
and :class:`carclf.explain.Explainer` checks with the same functions, so both refuse with the
same words. Nothing here imports torch or pytorch-grad-cam, so the ingress replicas do not load
the explanation stack.
"""

from __future__ import annotations

import re

from carclf.errors import UserInputError, shown

# The CAM methods of pytorch-grad-cam that carclf offers, by the names clients use;
# carclf.explain.METHODS pairs each with its class.
METHOD_NAMES = ("gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam")

# A class index as clients write it: ASCII digits only, since str.isdigit() also accepts "²" or
# "٣", which int() then refuses; at most 18 digits, as no model has more classes than that and
# int() of a longer string costs time (and fails past 4,300 digits).
_INDEX = re.compile(r"-?[0-9]+")
_MAX_INDEX_DIGITS = 18


def check_method(method: object) -> str:
    """``method`` if it names one of :data:`METHOD_NAMES`.

    Raises:
        UserInputError: anything else.
    """
    if not isinstance(method, str) or method not in METHOD_NAMES:
        raise UserInputError(f"method: unknown {shown(method)}; one of {', '.join(METHOD_NAMES)}")
    return method


def class_index(target: object, labels: list[str]) -> int | None:
    """The class index a client asks for: an index, a class name, or None (the predicted class).

    Args:
        target: an int, a class name, a string of ASCII digits, or None / "" for the prediction.
        labels: class names in index order.

    Raises:
        UserInputError: anything else, or a class the model does not have.
    """
    if target is None or target == "":
        return None
    if isinstance(target, bool) or not isinstance(target, (int, str)):
        raise UserInputError(f"target: a class name or index is needed, got {shown(target)}")
    if isinstance(target, str) and not _INDEX.fullmatch(target):
        if target not in labels:
            raise UserInputError(f"target: unknown class {shown(target)}")
        return labels.index(target)
    if isinstance(target, str):
        index = int(target) if len(target.lstrip("-")) <= _MAX_INDEX_DIGITS else len(labels)
    else:
        index = target
    if not 0 <= index < len(labels):
        raise UserInputError(f"target: class index {shown(target)} is outside 0..{len(labels) - 1}")
    return index
