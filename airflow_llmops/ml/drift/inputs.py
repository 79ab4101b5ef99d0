"""Inputs of a drift check: the reference (a prepared dataset's training split), a time window of the request
log, a latency baseline, and simulated traffic for tests and benchmarks."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import pandas as pd


class DriftError(ValueError):
    """The inputs of a drift check are unusable; the message says which file or value and what to do."""


# ---- inputs ----------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Reference:
    """The training split of a prepared dataset: texts, labels and the manifest's content hash."""

    data: pd.DataFrame
    content_hash: str
    uri: str


def load_reference(folder: str | Path, *, split: str = "train") -> Reference:
    """Read ``<folder>/manifest.json`` and the split it lists (``text``, ``label`` columns)."""
    import pandas as pd

    folder = Path(str(folder).removeprefix("file://"))
    manifest_path = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError:
        raise DriftError(
            f"reference dataset {folder} has no manifest.json; give the folder PrepareDatasetOperator wrote"
        ) from None
    except ValueError as err:
        raise DriftError(f"reference manifest {manifest_path} is not valid JSON: {err}") from None
    name = f"{split}.parquet"
    files = manifest.get("files") or {}
    if name not in files:
        raise DriftError(f"reference manifest {manifest_path} lists no {name} (it lists {sorted(files)})")
    path = folder / name
    if not path.is_file():
        raise DriftError(
            f"reference manifest {manifest_path} points to {name}, but {path} is missing; "
            "re-run the dataset preparation or point the drift check at a complete dataset folder"
        )
    data = pd.read_parquet(path)
    if "text" not in data.columns:
        raise DriftError(f"reference {path} has no 'text' column (columns: {list(data.columns)})")
    keep = [c for c in ("text", "label") if c in data.columns]
    data = data[keep].dropna(subset=["text"]).reset_index(drop=True)
    if data.empty:
        raise DriftError(f"reference {path} has no rows")
    return Reference(data=data, content_hash=str(manifest.get("content_hash", "")), uri=str(folder))


@dataclasses.dataclass
class Window:
    """Records of the request log with ``start <= ts < end`` (mirrored shadow copies left out); ``files_read``
    counts the log files opened for it."""

    data: pd.DataFrame
    start: float
    end: float
    corrupt_lines: int = 0
    files_read: int = 0


def read_window(folder: str | Path, start: float, end: float, *, include_shadow: bool = False) -> Window:
    """One time window of the request log; unreadable lines are skipped and counted.

    Only the log files whose time range overlaps the window are opened (chosen by their names and mtimes), so the
    cost follows the window's traffic, not the size of the whole log.
    """
    import pandas as pd

    from airflow_llmops.serving.request_log import read_request_log

    corrupt = files = 0

    def count(_path: Path, _line: int) -> None:
        nonlocal corrupt
        corrupt += 1

    def opened(_path: Path) -> None:
        nonlocal files
        files += 1

    rows: list[dict[str, Any]] = []
    folder = Path(str(folder).removeprefix("file://"))
    if folder.is_dir():
        for record in read_request_log(folder, since=start, until=end, on_corrupt=count, on_file=opened):
            if record.get("shadow") and not include_shadow:
                continue
            rows.append(window_row(record))
    frame = pd.DataFrame(rows, columns=WINDOW_COLUMNS)
    return Window(data=frame, start=start, end=end, corrupt_lines=corrupt, files_read=files)


#: The columns of :attr:`Window.data`; a missing latency (Data Capture records none) is NaN.
WINDOW_COLUMNS = ["ts", "variant", "status", "latency_ms", "input", "output"]


def window_row(record: dict[str, Any]) -> dict[str, Any]:
    """One request-log record as a row of :attr:`Window.data`."""
    return {
        "ts": float(record.get("ts", 0)),
        "variant": str(record.get("variant", "")),
        "status": int(record.get("status") or 0),
        "latency_ms": _float_or_nan(record.get("latency_ms")),
        "input": _text(record.get("input")),
        "output": record.get("output"),
    }


def earliest_latencies(folder: str | Path, *, span_s: float, before: float, limit: int) -> list[float]:
    """Latencies of the first ``span_s`` seconds of the request log (a baseline), ending before ``before``."""
    from airflow_llmops.serving.request_log import read_request_log

    folder = Path(str(folder).removeprefix("file://"))
    if not folder.is_dir():
        return []
    out: list[float] = []
    first: float | None = None
    for record in read_request_log(folder):
        ts = float(record.get("ts", 0))
        first = ts if first is None else first
        if ts >= first + span_s or ts >= before or len(out) >= limit:
            break
        latency = _float_or_nan(record.get("latency_ms"))
        if not record.get("shadow") and int(record.get("status") or 0) < 400 and not math.isnan(latency):
            out.append(latency)
    return out


def _float_or_nan(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return ""
    return json.dumps(value, ensure_ascii=False, default=str)


# ---- simulated traffic (tests, bench) --------------------------------------------------------------------------
def simulated_records(
    texts: Sequence[str],
    outputs: Sequence[str],
    *,
    start: float,
    end: float,
    seed: int = 0,
    latency_ms: tuple[float, float] = (40.0, 8.0),
    variant: str = "v1",
    endpoint: str = "sim",
) -> list[dict[str, Any]]:
    """Request-log records for ``texts`` spread evenly over ``[start, end)`` with normal latencies."""
    import random

    rng = random.Random(seed)
    step = (end - start) / max(len(texts), 1)
    return [
        {
            "ts": start + i * step,
            "request_id": f"sim-{seed}-{i}",
            "index": 0,
            "variant": variant,
            "shadow": False,
            "endpoint": endpoint,
            "status": 200,
            "latency_ms": max(1.0, rng.gauss(*latency_ms)),
            "input": text,
            "output": output,
            "score": 0.9,
            "tokens_in": len(text.split()),
            "tokens_out": 1,
        }
        for i, (text, output) in enumerate(zip(texts, outputs, strict=True))
    ]


def write_request_log(folder: str | Path, records: Iterable[dict[str, Any]], *, name: str = "sim") -> Path:
    """Append ``records`` to ``<folder>/requests-<name>.jsonl`` (the server's file format)."""
    from airflow_llmops.serving.request_log import PREFIX, SUFFIX

    path = Path(folder) / f"{PREFIX}{name}{SUFFIX}"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as out:
        for record in records:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    return path
