"""Load a reference DAG by id from dags/ (as the DAG processor would, by file)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def load_dag(dag_id: str, *, folder: str = "dags", module: str | None = None, attr: str = "dag"):  # type: ignore[no-untyped-def]
    """Import ``<folder>/<module or dag_id>.py`` by path and return its DAG object ``attr``."""
    path = ROOT / folder / f"{module or dag_id}.py"
    spec = importlib.util.spec_from_file_location(f"refdag_{module or dag_id}", path)
    assert spec and spec.loader
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = loaded
    spec.loader.exec_module(loaded)
    dag = getattr(loaded, attr)
    assert dag.dag_id == dag_id
    return dag
