"""Parse cost of the reference DAGs and of ``import airflow_llmops.operators``, as the DAG processor pays it.

Each measurement runs in a fresh interpreter that has already imported ``airflow.sdk`` (as the DAG processor
has); Airflow's own import is not ours and is reported separately. Prints a table, writes JSON.

    .venv/bin/python bench/parse.py [--repeats 7] [--out bench/results/parse.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import importlib.util, json, sys, time
t0 = time.perf_counter()
import airflow.sdk
t1 = time.perf_counter()
target = sys.argv[1]
if target.endswith(".py"):
    spec = importlib.util.spec_from_file_location("dag_file", target)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
else:
    __import__(target)
t2 = time.perf_counter()
print(json.dumps({"airflow_sdk_s": t1 - t0, "target_s": t2 - t1}))
"""


def measure(target: str, repeats: int) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    samples, sdk = [], []
    for _ in range(repeats):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, target], capture_output=True, text=True, env=env, check=True
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        samples.append(row["target_s"])
        sdk.append(row["airflow_sdk_s"])
    return {
        "median_s": statistics.median(samples),
        "max_s": max(samples),
        "min_s": min(samples),
        "airflow_sdk_import_median_s": statistics.median(sdk),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "parse.json")
    args = parser.parse_args()

    targets = [("import airflow_llmops.operators", "airflow_llmops.operators", 0.050)]
    targets += [(f"dags/{p.name}", str(p), 0.5) for p in sorted((ROOT / "dags").glob("*.py"))]
    rows = []
    for label, target, budget in targets:
        result = measure(target, args.repeats)
        rows.append({"target": label, "budget_s": budget, "within_budget": result["max_s"] < budget, **result})

    print(f"{'target':<40} {'median ms':>10} {'max ms':>8} {'budget ms':>10}  ok")
    for row in rows:
        print(
            f"{row['target']:<40} {row['median_s'] * 1e3:>10.1f} {row['max_s'] * 1e3:>8.1f} "
            f"{row['budget_s'] * 1e3:>10.0f}  {'yes' if row['within_budget'] else 'NO'}"
        )
    sdk = statistics.median(r["airflow_sdk_import_median_s"] for r in rows)
    print(f"(import airflow.sdk itself, not counted above: {sdk * 1e3:.0f} ms median; {args.repeats} runs each)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    payload = {"python": platform.python_version(), "machine": platform.machine(), "cpus": os.cpu_count(), "rows": rows}
    args.out.write_text(json.dumps(payload, indent=2))
    print(f"wrote {args.out}")
    return 0 if all(r["within_budget"] for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
