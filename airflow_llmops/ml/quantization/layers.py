"""Layer groups: the unit the accuracy-aware search keeps in fp32 (an encoder block, the embeddings, the head).

Few enough groups (a 6-layer encoder has 8) that trying each in fp32 costs few trials; the same names for the
torch modules and the ONNX nodes of a model, so a report reads the same whatever the method.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_LAYER = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)(?:\.|$)")


def layer_group(module_path: str) -> str:
    """The layer group of a module (or weight) path: ``layer.N`` for the N-th block of a stack, ``embeddings``
    for embedding tables, ``head`` for the rest (pooler, classifier, LM head)."""
    found = _LAYER.search(module_path)
    if found:
        return f"layer.{int(found.group(1))}"
    if "embed" in module_path.lower() or module_path.endswith(("wte", "wpe")):
        return "embeddings"
    return "head"


def group_order(groups: Sequence[str]) -> list[str]:
    """Groups in model order: embeddings, layer.0, layer.1, ..., head."""

    def key(name: str) -> tuple[int, int]:
        if name == "embeddings":
            return (0, 0)
        if name.startswith("layer."):
            return (1, int(name.split(".", 1)[1]))
        return (2, 0)

    return sorted(set(groups), key=key)
