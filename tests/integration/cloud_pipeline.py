"""What the cloud pipeline tests share: traffic to an endpoint while a rollout runs, and a retrained version to
roll out (a new registry version of an already logged model)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Traffic:
    """Requests to an endpoint from a background thread while a rollout runs (what its steps are judged on).

    ``send(i)`` makes the i-th request and returns what the test wants to keep; an exception (the endpoint is
    changing) is kept as ``(0, message, None)`` and the requests go on, as a client's would."""

    def __init__(self, send: Callable[[int], Any], *, every_s: float = 0.2) -> None:
        self.send, self.every_s, self.answers = send, every_s, []  # type: ignore[var-annotated]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                self.answers.append(self.send(i))
            except Exception as err:
                self.answers.append((0, str(err), None))
            i += 1
            time.sleep(self.every_s)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def register_again(mlflow_url: str, model: str, version: str) -> str:
    """A new registry version of ``model`` from the files ``version`` was logged with (a retrained model);
    returns its ``models:/`` URI."""
    import mlflow
    from mlflow import MlflowClient

    source = MlflowClient(tracking_uri=mlflow_url, registry_uri=mlflow_url).get_model_version(model, version).source
    mlflow.set_tracking_uri(mlflow_url)
    mlflow.set_registry_uri(mlflow_url)
    return f"models:/{model}/{mlflow.register_model(source, model).version}"
