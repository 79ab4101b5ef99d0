"""The job directory: the files a training job shares with whoever watches it (progress, status, checkpoints).

Only rank 0 writes here. Readers (the operator, a sensor) tail ``progress.jsonl`` while the job runs and read
``status.json`` once the process has exited, so the status file is replaced atomically and progress lines are
flushed one by one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Any one of these means the checkpoint holds model weights (full model, adapter, sharded or legacy format).
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
STATE_FILE = "trainer_state.json"


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int


@dataclass(frozen=True)
class JobDir:
    root: Path

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def progress(self) -> Path:
        return self.root / "progress.jsonl"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def tokenizer(self) -> Path:
        return self.root / "tokenizer"

    @property
    def mlflow(self) -> Path:
        return self.root / "mlflow.json"

    def write_json(self, path: Path, payload: Mapping[str, Any]) -> None:
        """Write through a temporary file and rename, so a reader never sees half a file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        os.replace(tmp, path)

    def write_status(self, payload: Mapping[str, Any]) -> None:
        self.write_json(self.status, payload)

    def clear_status(self) -> None:
        """A retry must not leave the previous attempt's final status for a watcher to pick up."""
        self.status.unlink(missing_ok=True)

    def complete_checkpoints(self) -> list[Checkpoint]:
        """Checkpoints with weights and a readable trainer state, oldest first.

        The Trainer writes ``trainer_state.json`` after the weights, optimizer and RNG states, so a checkpoint
        cut short by a crash lacks it (or holds a truncated one, which does not parse).
        """
        found: list[Checkpoint] = []
        if not self.checkpoints.is_dir():
            return found
        for child in self.checkpoints.iterdir():
            match = CHECKPOINT_PATTERN.match(child.name)
            if not match or not child.is_dir():
                continue
            if not any((child / name).is_file() for name in WEIGHT_FILES):
                continue
            step = _state_step(child / STATE_FILE)
            if step is not None:
                found.append(Checkpoint(child, step))
        return sorted(found, key=lambda c: c.step)

    def latest_checkpoint(self) -> Checkpoint | None:
        complete = self.complete_checkpoints()
        return complete[-1] if complete else None

    def remove_incomplete_checkpoints(self) -> list[Path]:
        """Delete checkpoint folders a crash left half-written, so that checkpoint rotation (which keeps the
        newest N by modification time) never counts one of them and deletes a good checkpoint instead."""
        if not self.checkpoints.is_dir():
            return []
        complete = {c.path for c in self.complete_checkpoints()}
        removed = []
        for child in self.checkpoints.iterdir():
            if CHECKPOINT_PATTERN.match(child.name) and child.is_dir() and child not in complete:
                shutil.rmtree(child, ignore_errors=True)
                removed.append(child)
        return removed


def _state_step(path: Path) -> int | None:
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
        return int(state["global_step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


class ProgressWriter:
    """Appends one JSON object per line to ``progress.jsonl`` and flushes it, so a tail sees each line at once.

    A retry appends to the same file: a reader that keeps its offset keeps working, and the steps in the new
    lines show where the retry resumed.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._handle: IO[str] = path.open("a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        self._handle.write(json.dumps(record, sort_keys=True) + "\n")
        self._handle.flush()

    def close(self) -> None:
        self._handle.close()
