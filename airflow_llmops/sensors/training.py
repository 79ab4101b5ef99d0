"""TrainingJobSensor: wait for a training job on any platform, e.g. one started by another task or DAG."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk import BaseSensorOperator, conf
from airflow.sdk.exceptions import AirflowException

from airflow_llmops.platforms.base import JobHandle, JobState, JobStatus

if TYPE_CHECKING:
    from airflow.sdk import Context


class TrainingJobSensor(BaseSensorOperator):
    """Succeeds when the job succeeds; fails with the platform's message when it fails or is cancelled.

    :param handle: the job's handle as a dict (templated; e.g. the ``job`` XCom of a TrainModelOperator).
    :param platform_kwargs: how to rebuild the platform (local: ``{"jobs_root": ...}``).
    :param deferrable: wait in the triggerer.
    """

    template_fields: Sequence[str] = ("handle", "platform_kwargs")

    def __init__(
        self,
        *,
        handle: Mapping[str, Any] | str,
        platform_kwargs: Mapping[str, Any] | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.handle = handle
        self.platform_kwargs = platform_kwargs
        self.deferrable = deferrable

    def _job(self) -> JobHandle:
        if not isinstance(self.handle, Mapping):
            raise AirflowException(f"{self.task_id}: handle must be a job handle dict, got {self.handle!r}")
        return JobHandle.from_dict(self.handle)

    def _platform_kwargs(self, handle: JobHandle) -> dict[str, Any]:
        if self.platform_kwargs is not None:
            return dict(self.platform_kwargs)
        if handle.platform == "local":
            from airflow_llmops.operators.training import default_local_jobs_root

            return {"jobs_root": default_local_jobs_root()}
        return {}

    def _verdict(self, handle: JobHandle, status: JobStatus) -> bool:
        if status.state is JobState.SUCCEEDED:
            return True
        if status.state.is_terminal:
            raise AirflowException(f"training job {handle.job_name} {status.state.value}: {status.message}")
        return False

    def execute(self, context: Context) -> Any:
        if not self.deferrable:
            return super().execute(context)
        from airflow_llmops.triggers.training import TrainingJobTrigger

        handle = self._job()
        if self.poke(context):
            return None
        self.defer(
            trigger=TrainingJobTrigger(
                platform=handle.platform,
                platform_kwargs=self._platform_kwargs(handle),
                handle=handle.to_dict(),
                poll_interval=float(self.poke_interval),
                timeout=float(self.timeout),
            ),
            method_name="execute_complete",
        )
        return None

    def poke(self, context: Context) -> bool:
        from airflow_llmops.platforms import get_platform

        handle = self._job()
        platform = get_platform(handle.platform, **self._platform_kwargs(handle))
        return self._verdict(handle, platform.get_training_status(handle))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> None:
        handle = JobHandle.from_dict(event["handle"])
        if event["status"].get("state") == "timeout":
            raise AirflowException(f"training job {handle.job_name}: {event['status'].get('message')}")
        self._verdict(handle, JobStatus.from_dict(event["status"]))
