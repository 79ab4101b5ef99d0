"""Test-wide setup: an isolated AIRFLOW_HOME (SQLite) per session, set before Airflow is imported."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
DAGS = ROOT / "dags"
_HOME = Path(tempfile.mkdtemp(prefix="llmops-airflow-home-"))

os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS)
# dag.test() only runs DAGs found in a configured bundle: the reference DAGs, and the tests' own DAG files.
TEST_DAGS = ROOT / "tests" / "dags"
os.environ["AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST"] = json.dumps(
    [
        {"name": name, "classpath": "airflow.dag_processing.bundles.local.LocalDagBundle", "kwargs": {"path": str(p)}}
        for name, p in (("dags-folder", DAGS), ("test-dags", TEST_DAGS))
    ]
)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__LLMOPS__ARTIFACT_ROOT"] = str(_HOME / "artifacts")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("NO_PROXY", "*")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def service_up(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1)
        return sock.connect_ex((host, port)) == 0


def require_service(name: str, host: str, port: int) -> None:
    """Skip where a service is absent on a developer machine; fail under CI=true, where it must be there."""
    if service_up(host, port):
        return
    message = f"{name} is not reachable on {host}:{port}"
    if IN_CI:
        pytest.fail(f"{message}, and CI=true requires it")
    pytest.skip(message)


def require_module(name: str) -> ModuleType:
    """Import an optional dependency (an extra or a dev tool) for a test module or test: skip where it is not
    installed on a developer machine, fail under CI=true, where the environment must have it. Works at module
    level (instead of ``pytest.importorskip``) and inside a test. A module that is installed but fails to import
    is an error everywhere."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name is None or not (name == err.name or name.startswith(f"{err.name}.")):
            raise  # installed, but one of its own imports is missing: a broken environment, not an absent extra
        message = f"{name} is not installed"
        if IN_CI:
            pytest.fail(f"{message}, and CI=true requires it (install the project with its extras)", pytrace=False)
        pytest.skip(message, allow_module_level=True)


def prepare_chatterbot(
    folder: Path, *, kind: str = "classification", topics: str = "ai,food,greetings,money", **split: float
) -> Path:
    """A small prepared dataset (the data stage's real code) from the bundled dialog corpus: ``kind``
    ``classification``, ``dialog`` (causal LM) or ``chat`` (conversations)."""
    from airflow_llmops.ml.data.chatterbot import load_chatterbot
    from airflow_llmops.ml.data.prepare import prepare_records, serialise
    from airflow_llmops.specs import DatasetSpec

    uri = f"chatterbot://english?topics={topics}"
    task = kind if kind in ("classification", "chat") else "causal_lm"
    spec = DatasetSpec(name=folder.name, source=uri, task=task, split=split or {})
    records = load_chatterbot(uri, kind=kind if kind in ("classification", "chat") else "dialog")
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in serialise(prepare_records(records, spec)).items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="session")
def airflow_home() -> Path:
    return _HOME


@pytest.fixture(scope="session")
def airflow_db(airflow_home: Path) -> Path:
    """A migrated SQLite metadata database for dag.test()."""
    airflow = Path(sys.executable).with_name("airflow")
    subprocess.run([str(airflow), "db", "migrate"], check=True, capture_output=True, env=os.environ.copy())
    return airflow_home


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    shutil.rmtree(_HOME, ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under ``--dist loadgroup`` the end-to-end tests (each a whole Airflow stack) would share one worker. (The
    suite runs ``--dist loadfile``: with pytest 9, xdist 3.8 ignores ``xdist_group`` markers; see scripts/test.)"""
    for item in items:
        if item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.xdist_group("airflow-stack"))


def train_classifier(job_dir: Path, dataset: Path, *, steps: int = 40, learning_rate: float = 3e-4) -> Path:
    """A small fine-tuned MiniLM classifier (the training entry point, one process); returns its model folder."""
    import json
    import subprocess
    import sys

    from airflow_llmops.specs import TrainingSpec

    spec = TrainingSpec(
        dataset_uri=str(dataset),
        max_steps=steps,
        learning_rate=learning_rate,
        per_device_batch_size=16,
        max_seq_length=32,
        checkpoint_every_steps=10_000,
        log_every_steps=10,
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    argv = [sys.executable, "-m", "airflow_llmops.ml.train", "--spec", spec.to_json(), "--job-dir", str(job_dir)]
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return Path(json.loads((job_dir / "status.json").read_text())["model_uri"])


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real MLflow tracking server (SQLite backend), one for the session (starting one takes ~15 s); modules use
    their own experiment and registered-model names."""
    from airflow_llmops.devstack.mlflow_server import MLflowServer

    server = MLflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def _no_leaked_mlflow_uri() -> Iterator[None]:
    """``mlflow.set_tracking_uri`` / ``set_registry_uri`` also set ``$MLFLOW_TRACKING_URI`` / ``$MLFLOW_REGISTRY_URI``
    for the whole process: restored after each test, so a later test's Airflow stack (which inherits the worker's
    environment) does not register into another test's MLflow server."""
    names = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {name: os.environ.get(name) for name in names}
    yield
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="module")
def own_mlflow(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """An MLflow server of the module's own, for modules that register the reference pipeline's model names: their
    registered models and champions are not the ones other tests on the worker registered (a cloud pipeline's
    five-topic champion would fail a sixteen-topic evaluate)."""
    from airflow_llmops.devstack.mlflow_server import MLflowServer

    server = MLflowServer(tmp_path_factory.mktemp("own-mlflow")).start()
    yield server
    server.stop()


@contextlib.contextmanager
def moto_s3(mp: pytest.MonkeyPatch, conn_id: str, bucket: str) -> Iterator[Any]:
    """A moto S3 server on loopback with ``bucket``, reachable through the Airflow connection ``conn_id`` (set in the
    environment); yields a boto3 client for the test's own checks."""
    import boto3
    from botocore.config import Config
    from moto.server import ThreadedMotoServer

    from airflow_llmops.processes import free_port

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    conn = {
        "conn_type": "aws",
        "login": "testing",
        "password": "testing",
        "extra": {"endpoint_url": endpoint, "region_name": "us-east-1"},
    }
    mp.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps(conn))
    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}),  # botocore retries moto's 500s otherwise
    )
    client.create_bucket(Bucket=bucket)
    try:
        yield client
    finally:
        server.stop()
