"""DriftCheckOperator: one window of an endpoint's traffic (its request log, SageMaker Data Capture or Vertex AI
request-response logging) against the training data, and the retrain signal."""

from __future__ import annotations

import datetime as dt
import json
import re
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.sdk import Asset, AssetAlias, ObjectStoragePath
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.artifacts import DriftReportLink
from airflow_llmops.operators.base import LLMOpsBaseOperator, as_storage_path, is_remote, local_folder, stage_in
from airflow_llmops.operators.training import default_mlflow_tracking_uri
from airflow_llmops.specs import DriftPolicy, SpecValidationError
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

    from airflow_llmops.ml.drift import CaptureWindow, DriftResult, Window


_YEAR = re.compile(r"^\d{4}$")
_FORMATS = ("sagemaker", "vertex", "azureml")
_TITLES = {
    "sagemaker": "SageMaker Data Capture",
    "vertex": "Vertex AI request-response log",
    "azureml": "Azure ML data collection",
}
_COLLECTIONS = frozenset({"request", "response"})  # Azure ML's payload-logging collections


def _folders(root: ObjectStoragePath) -> list[ObjectStoragePath]:
    try:
        return [child for child in root.iterdir() if child.is_dir()]
    except FileNotFoundError:
        return []


def _remote_format(root: ObjectStoragePath, children: list[ObjectStoragePath]) -> str:
    """Azure ML's collections (``<deployment>/request|response/...``), Data Capture (other folders) or a flat
    export of Vertex's logging table."""
    names = {c.name for c in children}
    if names & _COLLECTIONS or any({g.name for g in _folders(c)} & _COLLECTIONS for c in children[:3]):
        return "azureml"
    return "sagemaker" if children else "vertex"


_NO_LATENCY = {
    "sagemaker": "SageMaker Data Capture records no latency: skipped (see CloudWatch ModelLatency)",
    "vertex": "Vertex AI request-response logging records no latency: skipped (see Cloud Monitoring "
    "prediction_latencies)",
    "azureml": "Azure ML data collection records no latency: skipped (see Azure Monitor RequestLatency)",
}


def _given(value: Any) -> bool:
    """A templated URI that rendered to something (``""`` and ``"None"`` are what an absent param renders to)."""
    return value is not None and str(value).strip() not in ("", "None")


def drift_asset(model: str) -> Asset:
    """The Asset a drifted window of ``model``'s traffic updates (``x-`` scheme: no provider URI handlers load
    at parse time). Its events carry the scores and the window in ``extra``; schedule a retrain DAG on it."""
    return Asset(f"x-llmops://{model}/drift", group="llmops-drift")


def drift_alias(model: str) -> AssetAlias:
    """The outlet :class:`DriftCheckOperator` declares: an event reaches :func:`drift_asset` through it only when
    a window drifts outside the cooldown (a plain Asset outlet records an event on every successful run)."""
    return AssetAlias(f"llmops-drift-{model}")


def _timestamp(value: Any) -> float | None:
    if value is None or value in {"", "None"}:
        return None
    if isinstance(value, dt.datetime):
        return value.timestamp()
    if isinstance(value, int | float):
        return float(value)
    text = str(value)
    try:
        return float(text)
    except ValueError:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise AirflowFailException(f"window_end={text!r} is neither unix seconds nor an ISO 8601 time") from None
    return (parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.timezone.utc)).timestamp()


def _mlflow_run(tracking: str, experiment: str, run_name: str, tags: dict[str, str]) -> tuple[Any, Any]:
    """(client, run): a new MLflow run in ``experiment`` (created when missing)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking)
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    return client, client.create_run(experiment_id, run_name=run_name, tags=tags)


class DriftCheckOperator(LLMOpsBaseOperator):
    """Compare the last ``policy.window_minutes`` of an endpoint's request log with the training split of the
    prepared dataset it was trained on (Evidently: text descriptors, all-MiniLM-L6-v2 embeddings, predicted
    labels, latency; see :mod:`airflow_llmops.ml.drift`).

    Writes the Evidently HTML reports and ``drift.json`` to the run folder (linked from the task), logs the scores
    to MLflow when a tracking URI is configured, and returns a summary. When the window drifts, an event with the
    scores and the window in ``extra`` is added to :func:`drift_asset` (through the :func:`drift_alias` outlet)
    unless the last signal is less than ``policy.cooldown_hours`` old; the cooldown is kept in ``state_uri``.

    :param model_name: names the drift Asset ``x-llmops://<model_name>/drift``.
    :param reference_uri: prepared dataset folder (``manifest.json``, ``train.parquet``; templated).
    :param request_log_uri: folder of the endpoint's ``requests-*.jsonl`` files (templated).
    :param capture_uri: instead of a request log, the platform's own record of the traffic (templated). SageMaker
        Data Capture: the folder of one endpoint
        (``<DestinationS3Uri>/<endpoint>``, all its variants) or of one variant (``.../<endpoint>/<variant>``), on
        ``s3://`` (read through the artifact connection) or local. Only the hour folders of the window are staged
        (:mod:`airflow_llmops.ml.drift.capture`). Data Capture records no latency, so the latency check is skipped;
        the cooldown state defaults to ``<artifact_root>/drift-state.json``. Vertex AI request-response logging:
        the folder its BigQuery table was exported to as JSON (:mod:`airflow_llmops.ml.drift.vertex_log`), also
        without latency.
        Azure ML data collection: the folder of an endpoint's (or a deployment's) collections
        (``.../modelDataCollector/<endpoint>``: ``<deployment>/request|response/yyyy/MM/dd/HH/*.jsonl``;
        :mod:`airflow_llmops.ml.drift.azureml_collect`), also without latency.
    :param capture_format: ``sagemaker``, ``vertex``, ``azureml`` or ``auto`` (templated; default): locally the
        first line of the first file says; remotely ``request``/``response`` folders are Azure ML's, other folders
        Data Capture, flat JSON files Vertex's export.
    :param endpoint_name: a local endpoint whose log to read when ``request_log_uri`` is not given (templated):
        ``<[llmops] local_endpoints_root>/<endpoint_name>/requests``.
    :param policy: :class:`DriftPolicy`, a mapping or JSON of one (templated).
    :param window_end: end of the window: unix seconds, ISO 8601 or a datetime (templated); default the run's
        data interval end, else now.
    :param latency_baseline_uri: JSON file ``{"latency_ms": [...]}`` of reference latencies (templated); default
        ``<request log>/../drift-latency-baseline.json``, written from the log's earliest window when missing.
    :param state_uri: JSON file with the last retrain signal (templated); default
        ``<request log>/../drift-state.json``.
    :param cache_uri: local folder for cached reference embeddings; default ``<artifact_root>/drift-cache``.
    :param mlflow_tracking_uri: default ``[llmops] mlflow_tracking_uri`` or ``$MLFLOW_TRACKING_URI``; empty: none.
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "model_name",
        "reference_uri",
        "request_log_uri",
        "capture_uri",
        "capture_format",
        "endpoint_name",
        "policy",
        "window_end",
        "latency_baseline_uri",
        "state_uri",
        "mlflow_tracking_uri",
    )
    operator_extra_links = (DriftReportLink(),)
    ui_color = "#fff3e0"

    def __init__(
        self,
        *,
        model_name: str,
        reference_uri: str,
        request_log_uri: str | None = None,
        capture_uri: str | None = None,
        capture_format: str = "auto",
        endpoint_name: str | None = None,
        policy: DriftPolicy | Mapping[str, Any] | str | None = None,
        window_end: Any = None,
        latency_baseline_uri: str | None = None,
        state_uri: str | None = None,
        cache_uri: str | None = None,
        mlflow_tracking_uri: str | None = None,
        experiment: str = "llmops-drift",
        **kwargs: Any,
    ) -> None:
        if "outlets" not in kwargs and model_name and "{{" not in model_name:
            kwargs["outlets"] = [drift_alias(model_name)]
        super().__init__(**kwargs)
        self.model_name = model_name
        self.reference_uri = reference_uri
        self.request_log_uri = request_log_uri
        self.capture_uri = capture_uri
        self.capture_format = capture_format
        self._format = "sagemaker"
        self.endpoint_name = endpoint_name
        self.policy = policy
        self.window_end = window_end
        self.latency_baseline_uri = latency_baseline_uri
        self.state_uri = state_uri
        self.cache_uri = cache_uri
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.experiment = experiment

    # ---- inputs ------------------------------------------------------------------------------------------------
    def _policy(self) -> DriftPolicy:
        try:
            return DriftPolicy.parse(self.policy)
        except SpecValidationError as err:
            raise AirflowFailException(str(err)) from None

    def _log_path(self) -> ObjectStoragePath:
        if not self.request_log_uri:
            from airflow_llmops.operators.deploy import default_endpoints_root

            if not self.endpoint_name:
                raise AirflowFailException(f"{self.task_id}: give request_log_uri or endpoint_name")
            self.request_log_uri = f"{default_endpoints_root().rstrip('/')}/{self.endpoint_name}/requests"
        return as_storage_path(str(self.request_log_uri), self.artifact_connection())

    def _state_path(self) -> ObjectStoragePath:
        """``state_uri``; else beside the request log, or ``<artifact_root>/drift-state.json`` for Data Capture."""
        if not self.state_uri and self._uses_capture():
            return self.artifact_base() / "drift-state.json"
        return self._beside_log("drift-state.json", self.state_uri)

    def _beside_log(self, name: str, override: str | None) -> ObjectStoragePath:
        if override:
            return as_storage_path(override, self.artifact_connection())
        return self._log_path().parent / name

    def _local_log(self, workdir: Path) -> Path:
        """The request log as a local folder; a remote one is copied (its ``requests-*.jsonl`` files) first."""
        path = self._log_path()
        local = local_folder(path)
        if local is not None:
            return local
        target = workdir / "requests"
        target.mkdir(parents=True, exist_ok=True)
        if path.exists():
            for item in path.iterdir():
                if item.name.startswith("requests-") and item.name.endswith(".jsonl"):
                    (target / item.name).write_bytes(item.read_bytes())
        return target

    def _uses_capture(self) -> bool:
        if not _given(self.capture_uri):
            return False
        if _given(self.request_log_uri):
            raise AirflowFailException(
                f"{self.task_id}: give request_log_uri or capture_uri, not both (got {self.request_log_uri!r} and "
                f"{self.capture_uri!r})"
            )
        return True

    def _capture_window(self, workdir: Path, start: float, end: float) -> CaptureWindow:
        """The window's records from the platform's own capture; from a remote store, only the window's hour
        folders are staged (Data Capture, Azure ML's collections)."""
        uri = str(self.capture_uri).rstrip("/")
        fmt = str(self.capture_format or "auto").lower()
        if fmt not in ("auto", *_FORMATS):
            raise AirflowFailException(f"{self.task_id}: capture_format is auto, {', '.join(_FORMATS)}, not {fmt!r}")
        if not is_remote(uri):
            local = stage_in(uri)
            if fmt == "auto":
                from airflow_llmops.ml.drift.capture import detect_format

                fmt = detect_format(local)
            self._format = fmt
            return self._read(fmt, local, start, end)
        conn = self.artifact_connection()
        root = as_storage_path(uri, conn)
        children = _folders(root)
        if fmt == "auto":
            fmt = _remote_format(root, children)
        self._format = fmt
        if fmt == "vertex":  # an export of the logging table: flat files, staged whole
            return self._read(fmt, stage_in(uri, conn), start, end)
        hours: dict[str, str] = {}  # local folder -> remote folder holding yyyy/mm/dd/hh
        if fmt == "azureml":
            deployments = (
                {root.name: uri}
                if _COLLECTIONS & {c.name for c in children}
                else {child.name: f"{uri}/{child.name}" for child in children}
            )
            for name, deployment_uri in deployments.items():
                for collection in sorted(_COLLECTIONS):
                    hours[f"{name}/{collection}"] = f"{deployment_uri}/{collection}"
            until = end + 3600  # a response may be written into the next hour's folder
        else:
            if any(_YEAR.match(child.name) for child in children):  # a variant's folder: yyyy/mm/dd/hh below it
                hours = {root.name: uri}
            else:
                hours = {child.name: f"{uri}/{child.name}" for child in children}
            until = end
        local = self._stage_hours(workdir / "capture", hours, start, until, conn)
        return self._read(fmt, local, start, end)

    def _stage_hours(self, local: Path, hours: Mapping[str, str], start: float, end: float, conn: str | None) -> Path:
        """Links to the ``*.jsonl`` files of the hour folders of ``[start, end)`` under each remote folder."""
        from airflow_llmops.ml.drift.capture import SUFFIX, hour_prefixes

        staged = 0
        for name, remote in sorted(hours.items()):
            for prefix in hour_prefixes(start, end):
                try:
                    folder = stage_in(f"{remote}/{prefix}", conn)
                except FileNotFoundError:  # no traffic captured in that hour
                    continue
                target = local / name / prefix
                target.mkdir(parents=True, exist_ok=True)
                for file in folder.glob(f"*{SUFFIX}"):
                    (target / file.name).symlink_to(file)
                staged += 1
        self.log.info("%d hour folder(s) of %s staged from %s", staged, sorted(hours), self.capture_uri)
        local.mkdir(parents=True, exist_ok=True)
        return local

    def _read(self, fmt: str, folder: Path, start: float, end: float) -> CaptureWindow:
        from airflow_llmops.ml.drift import read_capture_window, read_vertex_log_window
        from airflow_llmops.ml.drift.azureml_collect import read_collected_window

        window: CaptureWindow
        if fmt == "vertex":
            window = read_vertex_log_window(folder, start, end)
        elif fmt == "azureml":
            window = read_collected_window(folder, start, end)
        else:
            window = read_capture_window(folder, start, end)
        self.log.info("%s: %d file(s) read from %s", _TITLES[fmt], window.files_read, self.capture_uri)
        return window

    def _window_end(self, context: Context) -> float:
        end = _timestamp(self.window_end)
        if end is None:
            end = _timestamp(context.get("data_interval_end"))
        return end if end is not None else time.time()

    def _latency_baseline(self, log: Path, start: float, policy: DriftPolicy) -> tuple[list[float], str]:
        from airflow_llmops.ml.drift import earliest_latencies

        path = self._beside_log("drift-latency-baseline.json", self.latency_baseline_uri)
        if path.exists():
            return [float(v) for v in json.loads(path.read_text())["latency_ms"]], display_uri(path)
        values = earliest_latencies(
            log, span_s=policy.window_minutes * 60, before=start, limit=max(policy.sample_size, 1000)
        )
        if len(values) < policy.min_rows:
            return [], ""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"latency_ms": values, "source": "earliest window of the request log"}))
        self.log.info("Latency baseline: %d latencies of the log's earliest window, saved to %s", len(values), path)
        return values, display_uri(path)

    # ---- cooldown ----------------------------------------------------------------------------------------------
    def _in_cooldown(self, state: ObjectStoragePath, end: float, run_id: str, hours: float) -> dict[str, Any] | None:
        """The last signal when it is less than ``hours`` before ``end`` (a retry of the signalling run is not)."""
        try:
            last = dict(json.loads(state.read_text())).get(self.model_name)
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(last, dict) or last.get("run_id") == run_id:
            return None
        age = end - float(last.get("window_end", 0))
        return last if 0 <= age < hours * 3600 else None

    def _record_signal(self, state: ObjectStoragePath, record: dict[str, Any]) -> None:
        try:
            data = dict(json.loads(state.read_text()))
        except (FileNotFoundError, ValueError):
            data = {}
        data[self.model_name] = record
        state.parent.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps(data, indent=1))

    # ---- run ---------------------------------------------------------------------------------------------------
    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_llmops.ml.drift import CheckResult, DriftError, compute_drift, load_reference, read_window

        policy = self._policy()
        capture = self._uses_capture()
        if not capture:
            self._log_path()  # resolves request_log_uri
        end = self._window_end(context)
        start = end - policy.window_minutes * 60
        out = self.run_folder(context) / "drift"
        with tempfile.TemporaryDirectory(prefix="llmops-drift-") as tmp:
            work = Path(tmp)
            try:
                reference = load_reference(self.stage_in(str(self.reference_uri), "reference dataset"))
            except DriftError as err:
                raise AirflowFailException(f"{self.task_id}: {err}") from None
            baseline: list[float] = []
            baseline_uri = ""
            window: Window
            if capture:
                window = captured = self._capture_window(work, start, end)
                if captured.corrupt_lines:
                    self.log.warning(
                        "Data Capture: skipped %d malformed line(s) in the window, e.g. %s",
                        captured.corrupt_lines,
                        "; ".join(captured.malformed_examples),
                    )
            else:
                log = self._local_log(work)
                window = read_window(log, start, end)
                if "latency" in policy.checks:
                    baseline, baseline_uri = self._latency_baseline(log, start, policy)
            result = compute_drift(
                reference,
                window,
                policy,
                reference_latency=baseline,
                cache_dir=self._cache_dir(),
                report_dir=work / "report",
            )
            if capture and "latency" in result.checks:
                result.checks["latency"] = CheckResult(drift=None, note=_NO_LATENCY[self._format])
            summary = self._summary(result, policy, reference.content_hash, baseline_uri)
            if capture:
                summary.update(
                    request_log_uri=None, capture_uri=display_uri(str(self.capture_uri)), capture_format=self._format
                )
                summary["capture_files"] = window.files_read
            (work / "report" / "drift.json").parent.mkdir(parents=True, exist_ok=True)
            (work / "report" / "drift.json").write_text(json.dumps(summary, indent=1, default=str))
            for file in sorted((work / "report").iterdir()):
                (out / file.name).parent.mkdir(parents=True, exist_ok=True)
                (out / file.name).write_bytes(file.read_bytes())
        main_report = out / "drift-report.html"
        summary["report_uri"] = display_uri(main_report if main_report.exists() else out / "drift.json")
        DriftReportLink().persist(context, summary["report_uri"])
        self.log.info(
            "Window %s .. %s of %s: %s (%s); %d rows, %d sampled, %d corrupt log lines; scores %s",
            summary["window"]["start_iso"],
            summary["window"]["end_iso"],
            self.model_name,
            result.verdict,
            result.note,
            result.rows,
            result.sampled_rows,
            result.corrupt_lines,
            result.scores(),
        )
        self._log_to_mlflow(context, result, summary, work_reports=[out / Path(p).name for p in result.reports])
        summary["signal"] = self._signal(context, result, summary, policy)
        return summary

    def _cache_dir(self) -> Path | None:
        if self.cache_uri:
            return Path(str(self.cache_uri).removeprefix("file://"))
        return local_folder(self.artifact_base() / "drift-cache")

    def _summary(self, result: DriftResult, policy: DriftPolicy, content_hash: str, baseline: str) -> dict[str, Any]:
        summary = result.to_dict()
        iso = {
            f"{k}_iso": dt.datetime.fromtimestamp(v, tz=dt.timezone.utc).isoformat()
            for k, v in summary["window"].items()
        }
        summary["window"].update(iso)
        summary.update(
            model=self.model_name,
            reference_uri=str(self.reference_uri),
            reference_content_hash=content_hash,
            request_log_uri=str(self.request_log_uri),
            latency_baseline_uri=baseline,
            scores=result.scores(),
            policy=policy.to_dict(),
        )
        return summary

    def _signal(self, context: Context, result: DriftResult, summary: dict[str, Any], policy: DriftPolicy) -> str:
        """``emitted``, ``cooldown`` (drifted, but a signal went out recently) or ``none``."""
        if not result.drift:
            return "none"
        state = self._state_path()
        last = self._in_cooldown(state, result.window_end, context["run_id"], policy.cooldown_hours)
        if last is not None:
            self.log.warning(
                "Drift detected, but the last retrain signal (run %s, window end %s) is within the %s h cooldown: "
                "no asset event",
                last.get("run_id"),
                last.get("window_end_iso"),
                policy.cooldown_hours,
            )
            return "cooldown"
        extra = {
            "model": self.model_name,
            "window": summary["window"],
            "scores": summary["scores"],
            "drifted_checks": result.drifted_checks,
            "rows": result.rows,
            "reference_uri": summary["reference_uri"],
            "reference_content_hash": summary["reference_content_hash"],
            "report_uri": summary["report_uri"],
            "dag_run": f"{context['dag'].dag_id}/{context['run_id']}",
        }
        alias = drift_alias(self.model_name)
        context["outlet_events"][alias].add(drift_asset(self.model_name), extra=extra)
        self._record_signal(
            state,
            {
                "run_id": context["run_id"],
                "window_end": result.window_end,
                "window_end_iso": summary["window"]["end_iso"],
                "signalled_at": time.time(),
            },
        )
        self.log.info("Drift: event on %s with %s", drift_asset(self.model_name).uri, extra["scores"])
        return "emitted"

    def _log_to_mlflow(
        self, context: Context, result: DriftResult, summary: dict[str, Any], work_reports: list[ObjectStoragePath]
    ) -> None:
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        if not tracking:
            return
        client, run = _mlflow_run(
            tracking,
            self.experiment,
            f"{self.model_name}-{int(result.window_end)}",
            {"llmops.model": self.model_name, "llmops.dag_run": f"{context['dag'].dag_id}/{context['run_id']}"},
        )
        step = int(result.window_end)
        metrics = {
            **{f"drift.{k}": v for k, v in result.scores().items()},
            "drift.detected": float(result.drift),
            "drift.rows": float(result.rows),
            "drift.corrupt_lines": float(result.corrupt_lines),
        }
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value, step=step)
        client.log_param(run.info.run_id, "verdict", result.verdict)
        with tempfile.TemporaryDirectory() as tmp:
            for report in work_reports:
                local = Path(tmp) / report.name
                local.write_bytes(report.read_bytes())
                client.log_artifact(run.info.run_id, str(local), "drift")
        client.set_terminated(run.info.run_id)
        summary["mlflow_run_id"] = run.info.run_id


class EndpointMetricsOperator(LLMOpsBaseOperator):
    """Record a local endpoint's live metrics over the last ``window_minutes`` to MLflow (one run per window, the
    window's start as the step, so each metric is a time series), and return them. Per variant: p50/p95
    latency, requests per minute, error rate, tokens. For the endpoint: requests per minute and energy.

    Energy is an estimate: the server process's CPU seconds in the window times ``watts_per_cpu_core`` gives
    ``energy_wh``, per 1k requests ``energy_wh_per_1k_requests`` and per 1k tokens (in + out)
    ``energy_wh_per_1k_tokens``. Set ``watts_per_cpu_core`` to your CPU's TDP divided by its cores (the default
    5 W is a mid-range server or laptop core under load); a GPU's board power is not included.

    It never starts a server: with no ``server.json`` or no answer the task is skipped with the reason.

    :param endpoint_name: the endpoint (templated).
    :param endpoints_root: folder of the local endpoints (templated); default ``[llmops] local_endpoints_root``.
    """

    template_fields: Sequence[str] = (*LLMOpsBaseOperator.template_fields, "endpoint_name", "endpoints_root")
    ui_color = "#fff3e0"

    def __init__(
        self,
        *,
        endpoint_name: str,
        endpoints_root: str | None = None,
        window_minutes: float = 60,
        watts_per_cpu_core: float = 5.0,
        mlflow_tracking_uri: str | None = None,
        experiment: str = "llmops-endpoints",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if watts_per_cpu_core <= 0:
            raise ValueError(f"watts_per_cpu_core must be > 0, got {watts_per_cpu_core}")
        self.endpoint_name = endpoint_name
        self.endpoints_root = endpoints_root
        self.window_minutes = window_minutes
        self.watts_per_cpu_core = watts_per_cpu_core
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self.experiment = experiment

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow.sdk.exceptions import AirflowSkipException

        from airflow_llmops.operators.deploy import default_endpoints_root
        from airflow_llmops.serving.client import ServingClient, ServingClientError

        folder = Path(str(self.endpoints_root or default_endpoints_root()).removeprefix("file://")) / self.endpoint_name
        try:
            url = str(json.loads((folder / "server.json").read_text())["url"])
            token = (folder / "admin-token").read_text().strip()
        except (OSError, ValueError, KeyError) as err:
            raise AirflowSkipException(f"endpoint {self.endpoint_name}: no running local server ({err})") from None
        since = time.time() - self.window_minutes * 60
        try:
            with ServingClient(url, token, timeout=30) as client:
                snapshot = client.metrics_snapshot(since)
        except ServingClientError as err:
            raise AirflowSkipException(f"endpoint {self.endpoint_name} at {url} did not answer: {err}") from None
        metrics = endpoint_metrics(snapshot, self.window_minutes, self.watts_per_cpu_core)
        self.log.info("Endpoint %s, last %s min: %s", self.endpoint_name, self.window_minutes, metrics)
        tracking = self.mlflow_tracking_uri if self.mlflow_tracking_uri is not None else default_mlflow_tracking_uri()
        run_id = ""
        if tracking and metrics:
            tracker, run = _mlflow_run(
                tracking, self.experiment, f"{self.endpoint_name}-{int(since)}", {"llmops.endpoint": self.endpoint_name}
            )
            for key, value in metrics.items():
                tracker.log_metric(run.info.run_id, key, value, step=int(since))
            tracker.set_terminated(run.info.run_id)
            run_id = run.info.run_id
        return {"endpoint": self.endpoint_name, "since": since, "metrics": metrics, "mlflow_run_id": run_id}


def endpoint_metrics(snapshot: Mapping[str, Any], window_minutes: float, watts_per_cpu_core: float) -> dict[str, float]:
    """Flat metrics of one admin snapshot: ``<variant>.<metric>`` per variant, ``endpoint.<metric>`` in total
    (shadow copies are work the server did, so they count towards energy but not towards requests served)."""
    metrics: dict[str, float] = {}
    served = tokens = 0.0
    for variant, values in dict(snapshot.get("variants", {})).items():
        requests = float(values.get("requests") or 0)
        metrics[f"{variant}.requests_per_minute"] = requests / window_minutes
        for key in ("p50_latency_ms", "p95_latency_ms", "error_rate", "requests", "errors", "tokens_in", "tokens_out"):
            if values.get(key) is not None:
                metrics[f"{variant}.{key}"] = float(values[key])
        tokens += float(values.get("tokens_in") or 0) + float(values.get("tokens_out") or 0)
        if not values.get("shadow"):
            served += requests
    metrics["endpoint.requests"] = served
    metrics["endpoint.requests_per_minute"] = served / window_minutes
    process = snapshot.get("process")
    if isinstance(process, Mapping) and process.get("cpu_seconds") is not None:
        cpu_s = float(process["cpu_seconds"])
        energy_wh = cpu_s * watts_per_cpu_core / 3600.0
        metrics["endpoint.cpu_seconds"] = cpu_s
        metrics["endpoint.energy_wh"] = energy_wh
        if served:
            metrics["endpoint.energy_wh_per_1k_requests"] = energy_wh / served * 1000.0
        if tokens:
            metrics["endpoint.energy_wh_per_1k_tokens"] = energy_wh / tokens * 1000.0
    return metrics
