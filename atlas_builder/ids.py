"""The one identifier of a unit: (model, layer, unit), parsed and formatted here.

A unit id is written `model/layer/unit`, e.g. `digits-cnn/conv1/3`: the model's
slug from the config, the layer's module path from `named_modules()`, and the
unit index (channel for conv outputs, feature for linear and token outputs).
The same triple keys every store table and every URL. This module does not
know about files or URLs (see urls.py); it only checks and converts ids.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import AtlasError

# Characters kept as they are when a layer path becomes a URL/file segment.
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True, order=True)
class UnitId:
    model: str
    layer: str
    unit: int

    def __str__(self) -> str:
        return f"{self.model}/{self.layer}/{self.unit}"

    @classmethod
    def parse(cls, text: str) -> "UnitId":
        """Parse `model/layer/unit`; the layer may itself hold dots but no '/'."""
        parts = text.strip().split("/")
        if len(parts) != 3 or not parts[0] or not parts[1] or not parts[2].isdigit():
            raise AtlasError(f"unit id {text!r} is not of the form model/layer/unit, e.g. digits-cnn/conv1/3")
        return cls(parts[0], parts[1], int(parts[2]))


def layer_slug(layer: str) -> str:
    """A file-system and URL safe, stable segment for a layer's module path.

    Ordinary module paths (`features.0`, `layer1.0.conv1`) are kept as they
    are, so URLs stay human-readable. Anything else (a name with '/', spaces,
    quotes, or only dots) is replaced by a safe spelling plus a short hash so
    it can never escape its folder or collide with another layer.
    """
    if _SAFE.match(layer) and ".." not in layer:
        return layer
    import hashlib

    safe = re.sub(r"[^A-Za-z0-9_-]+", "_", layer).strip("_")[:40] or "layer"
    return f"{safe}-{hashlib.sha1(layer.encode()).hexdigest()[:8]}"
