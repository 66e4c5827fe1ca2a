"""Small values and functions the stages share: the label the loss skips, a stable digest, perplexity from
a loss, a template's fields. The error type: pipeline.core.errors; the stage command: pipeline.core.cli."""

from __future__ import annotations

import hashlib
import json
import math
import string
from typing import Any

IGNORE_INDEX = -100  # label value the loss skips (padding, and later prompt tokens)


def digest(obj: Any) -> str:
    """A short stable hash of a JSON-able object."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def perplexity(loss: float) -> float:
    """exp(loss), inf where it overflows a float (a loss above ~709), NaN for NaN."""
    return math.exp(loss) if loss < 709.78 else (math.inf if loss == loss else math.nan)


def template_fields(template: str) -> list[str]:
    """The field names a format string uses ("{title}" -> ["title"])."""
    return [name.split(".")[0].split("[")[0] for _, name, _, _ in string.Formatter().parse(template) if name]
