"""The suite's markers mean what they say: ``-m "not e2e"`` collects no test that starts a whole Airflow stack, and
no test module skips silently for want of an installed package (``require_module`` fails under CI=true).

A module starts a stack when its code (read with ``ast``, not run) uses ``AirflowCluster`` (``airflow_llmops.
devstack.cluster``), runs an Airflow server component (``airflow standalone``/``scheduler``/``api-server``/
``dag-processor``/``triggerer``, ``celery worker``) or the demo (``airflow-llmops demo``), or runs a scheduler,
DAG processor or triggerer job in-process. Which of those modules pytest would collect under ``-m "not e2e"`` is
asked of pytest itself, in a subprocess, so markers from ``pytestmark``, decorators and conftest hooks all count.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
COMPONENTS = {"standalone", "scheduler", "api-server", "dag-processor", "triggerer", "worker"}
JOB_RUNNERS = {"SchedulerJobRunner", "DagProcessorJobRunner", "TriggererJobRunner"}


def _strings(node: ast.AST) -> list[str]:
    """String constants of a list/tuple/set literal (what an argv looks like), one level of starred lists too."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [s for elt in node.elts for s in _strings(elt.value if isinstance(elt, ast.Starred) else elt)]
    return []


def stack_starters(source: str) -> list[str]:
    """Why a test module's code starts an Airflow stack (empty: it does not)."""
    tree = ast.parse(source)
    why: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
            if any(n and (n == "AirflowCluster" or n.endswith("devstack.cluster")) for n in names):
                why.append(f"line {node.lineno}: imports the AirflowCluster")
        elif isinstance(node, ast.Name) and node.id in JOB_RUNNERS | {"AirflowCluster"}:
            why.append(f"line {node.lineno}: uses {node.id}")
        elif isinstance(node, ast.Attribute) and node.attr in JOB_RUNNERS | {"AirflowCluster"}:
            why.append(f"line {node.lineno}: uses {node.attr}")
        elif isinstance(node, ast.Call):
            # An argv given to a call: subprocess.run([airflow, "scheduler"]), ManagedProcess(..., [..., "demo"]).
            argv = [s for arg in [*node.args, *(k.value for k in node.keywords)] for s in _strings(arg)]
            components = COMPONENTS.intersection(argv)
            if "celery" not in argv:
                components.discard("worker")  # only `airflow celery worker` is an Airflow component
            if components:
                why.append(f"line {node.lineno}: runs airflow {' '.join(sorted(components))}")
            if "demo" in argv and "airflow-llmops" in source:
                why.append(f"line {node.lineno}: runs airflow-llmops demo (airflow standalone)")
    return sorted(set(why))


def _test_modules() -> list[Path]:
    return sorted(p for p in TESTS.rglob("test_*.py") if ".venv" not in p.parts)


def test_the_probe_finds_the_stacks_we_know_and_nothing_in_a_static_check():
    """Guard against a probe that cannot fail (or that flags everything)."""
    assert stack_starters((TESTS / "e2e" / "test_production_mode.py").read_text())
    assert stack_starters((TESTS / "e2e" / "test_demo.py").read_text())
    assert stack_starters("import subprocess\nsubprocess.run(['airflow', 'standalone'])\n")
    assert stack_starters("from airflow.jobs.scheduler_job_runner import SchedulerJobRunner\nSchedulerJobRunner(job)\n")
    assert stack_starters("import subprocess\nsubprocess.Popen([airflow, 'celery', 'worker'])\n")
    # Names in data (a compose file's expected commands), a log file's name, a demo with a fake Airflow: no stack.
    assert not stack_starters("EXPECTED = {'airflow-scheduler': ['airflow', 'scheduler']}\n")
    assert not stack_starters("path = home / 'standalone.log'\n")
    assert not stack_starters("from airflow_llmops.devstack import demo\ndemo.main(['--root', '/x', '--no-drift'])\n")


def test_not_e2e_collects_no_test_that_starts_an_airflow_stack():
    starters = {path: why for path in _test_modules() if (why := stack_starters(path.read_text()))}
    assert starters, "no test module starts an Airflow stack? The probe is broken"
    argv = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not e2e", "-p", "no:cacheprovider"]
    argv += [str(p) for p in starters]
    env = os.environ.copy()
    done = subprocess.run(argv, check=False, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    # Exit code 5: every test deselected, what we want; 0: some collected (listed below).
    assert done.returncode in (0, 5), done.stdout[-3000:] + done.stderr[-3000:]
    collected = [line for line in done.stdout.splitlines() if "::" in line]
    offenders = sorted({line.split("::", 1)[0] for line in collected})
    assert not offenders, "these modules start a whole Airflow stack but run under -m 'not e2e' (mark them e2e):\n" + (
        "\n".join(f"  {m}: {'; '.join(starters[ROOT / m])}" for m in offenders)
    )


def test_no_test_module_skips_silently_for_a_missing_package():
    """``pytest.importorskip`` skips even in CI; ``conftest.require_module`` fails there."""
    offenders = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for path in _test_modules()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr == "importorskip"
    ]
    assert not offenders, f"use conftest.require_module(...) instead of pytest.importorskip: {offenders}"
