"""Parse time stays light: DAG files and the operators package import no ML or cloud SDK."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = (
    "torch",
    "transformers",
    "mlflow",
    "great_expectations",
    "evidently",
    "pandas",
    "sklearn",
    "boto3",
    "botocore",
    "google.cloud.aiplatform",
    "azure.ai.ml",
    "numpy",
    # Loaded when something at parse time initialises Airflow's providers manager (e.g. an Asset whose URI
    # scheme lacks the `x-` prefix): seconds of parse time for every DAG file.
    "airflow.providers.amazon.aws.assets",
    "airflow.providers.google.assets",
)

PROBE = """
import importlib.util, json, sys
target = sys.argv[1]
if target.endswith(".py"):
    spec = importlib.util.spec_from_file_location("dag_under_test", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
else:
    __import__(target)
print(json.dumps(sorted(sys.modules)))
"""

TARGETS = ["airflow_llmops.operators", "airflow_llmops.specs", "airflow_llmops.platforms"] + [
    str(p) for p in sorted((ROOT / "dags").glob("*.py"))
]


@pytest.mark.parametrize("target", TARGETS, ids=lambda t: Path(t).name)
def test_import_pulls_in_no_heavy_module(target):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, "-c", PROBE, target], capture_output=True, text=True, env=env, check=True
    ).stdout
    loaded = set(json.loads(out.strip().splitlines()[-1]))
    heavy = sorted(name for name in HEAVY if name in loaded)
    assert not heavy, f"importing {target} loaded {heavy}; move those imports into execute() or the ML core"


def test_the_probe_would_notice_a_heavy_import(tmp_path):
    """Guard against a probe that cannot fail: a DAG importing pandas must be caught."""
    dag = tmp_path / "heavy_dag.py"
    dag.write_text("import pandas\n")
    out = subprocess.run([sys.executable, "-c", PROBE, str(dag)], capture_output=True, text=True, check=True).stdout
    assert "pandas" in json.loads(out.strip().splitlines()[-1])
