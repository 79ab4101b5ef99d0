"""Load a reference DAG by id from dags/ (as the DAG processor would, by file)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

DAGS = Path(__file__).resolve().parents[2] / "dags"


def load_dag(dag_id: str):  # type: ignore[no-untyped-def]
    path = DAGS / f"{dag_id}.py"
    spec = importlib.util.spec_from_file_location(f"refdag_{dag_id}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.dag
