"""Provider registration: the metadata is valid for Airflow, and everything it names imports."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from importlib.metadata import entry_points, version
from pathlib import Path

import jsonschema

import airflow_llmops
from airflow_llmops.provider_info import get_provider_info


def test_entry_point_is_registered():
    eps = [ep for ep in entry_points(group="apache_airflow_provider") if ep.value.startswith("airflow_llmops")]
    assert len(eps) == 1
    assert eps[0].load() is get_provider_info


def test_provider_info_matches_airflows_schema():
    import airflow

    schema = json.loads((Path(airflow.__file__).parent / "provider_info.schema.json").read_text())
    info = get_provider_info()
    jsonschema.validate(info, schema)
    assert info["package-name"] == "airflow-llmops"
    assert info["versions"][0] == airflow_llmops.__version__ == version("airflow-llmops")


def _named_modules_and_classes(info):
    for key in ("operators", "sensors", "hooks", "triggers"):
        for entry in info.get(key, []):
            yield from ((m, None) for m in entry["python-modules"])
    for link in info.get("extra-links", []):
        yield link.rsplit(".", 1)
    for conn in info.get("connection-types", []):
        yield conn["hook-class-name"].rsplit(".", 1)


def test_every_named_module_and_class_imports():
    named = list(_named_modules_and_classes(get_provider_info()))
    assert named, "the provider names nothing"
    for module_name, attr in named:
        module = importlib.import_module(module_name)
        if attr:
            assert hasattr(module, attr), f"{module_name} has no {attr}"


def test_every_operator_module_is_listed():
    """A new operator module that is not in the provider info would be invisible to Airflow's UI and docs."""
    info = get_provider_info()
    listed = {m for entry in info["operators"] for m in entry["python-modules"]}
    package = Path(airflow_llmops.__file__).parent / "operators"
    modules = {f"airflow_llmops.operators.{p.stem}" for p in package.glob("*.py") if p.stem not in ("__init__", "base")}
    assert modules == listed


def test_airflow_providers_list_shows_us(airflow_home):
    airflow = Path(sys.executable).with_name("airflow")
    out = subprocess.run(
        [str(airflow), "providers", "list", "--output", "json"],
        capture_output=True,
        text=True,
        check=True,
        env=os.environ.copy(),
    ).stdout
    providers = {p["package_name"]: p["version"] for p in json.loads(out[out.index("[") :])}
    assert providers.get("airflow-llmops") == airflow_llmops.__version__
