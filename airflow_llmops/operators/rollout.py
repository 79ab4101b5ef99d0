"""RolloutOperator: move traffic to a new version step by step, judge each step live, roll back on any failure.

Side effects (traffic, promotion, rollback) happen here in the worker; the bake of each step is waited for by
:class:`~airflow_llmops.triggers.rollout.RolloutStepTrigger`, which only reads metrics. Progress lives on the
endpoint (:class:`~airflow_llmops.platforms.base.RolloutRecord`), so a retry re-attaches where the walk stands.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import TYPE_CHECKING, Any, NamedTuple, NoReturn, TypeVar

from airflow.sdk import Asset, AssetAlias, BaseOperator, conf
from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

from airflow_llmops.operators.registry import model_alias_asset
from airflow_llmops.operators.training import default_mlflow_tracking_uri
from airflow_llmops.platforms.base import DeploymentPlatform, EndpointHandle, RolloutRecord
from airflow_llmops.specs import RolloutPlan

if TYPE_CHECKING:
    from airflow.sdk import Context

_VERSION = re.compile(r"^models:/(?P<name>[^/@]+)/(?P<version>\d+)$")
T = TypeVar("T")


class _Walk(NamedTuple):
    """What every step of one rollout acts on: the deploy task's XCom and the objects built from it."""

    rollout: dict[str, Any]
    platform: DeploymentPlatform
    handle: EndpointHandle
    plan: RolloutPlan


class RolloutOperator(BaseOperator):
    """Walk the rollout that :class:`~airflow_llmops.operators.deploy.DeployModelOperator` prepared.

    At each step of the plan (e.g. canary 10 → 50 → 100 %) the new variant gets its share, bakes for
    ``bake_seconds`` and is judged from the endpoint's numbers over that step against the SLO (p95 latency, error
    rate, optionally its p95 against the old variant's) once ``min_requests`` have arrived. Success leaves the new
    variant serving alone and, for a registry version, moves its ``champion`` alias (recorded, and emitted on the
    task's outlets). Any failure — a breached SLO, too little traffic by ``bake_seconds + max_wait_s``, the overall
    ``timeout``, an exception, the task being killed — restores exactly the weights from before the rollout and
    removes the new variant (``auto_rollback=False`` in the plan: left in place, and said so in the log and the
    endpoint's record).

    A rollout can be paused (from the LLMOps page, or :func:`~airflow_llmops.platforms.rollout.pause_rollout`): the
    request is written to the endpoint's rollout record, which the walk reads at every poll. While paused the
    current step holds: its traffic stays, it neither passes nor times out, nothing is promoted, but it is still
    judged, so a breach still rolls back. Resuming restarts the held step's bake (judged on the numbers after the
    resume). A pause longer than ``max_pause_s`` ends in a rollback with that reason.

    A retry (or another worker after this one was killed) re-attaches to the rollout recorded on the endpoint: it
    continues from the current step, and never starts a second walk. A rollout that was rolled back stays rolled
    back: deploy again to try again.

    :param rollout: the deploy task's return value (templated), e.g. ``"{{ ti.xcom_pull(task_ids='deploy') }}"``.
    :param poll_interval: seconds between metric reads during a bake.
    :param max_wait_s: how long a step may wait, past its bake time, for ``min_requests``.
    :param timeout: seconds the whole rollout may take from its first step (None: no limit beyond the steps').
    :param deferrable: wait for each bake in the triggerer (frees the worker slot).
    :param max_read_errors: failed metric reads in a row that end a step as an error.
    :param max_pause_s: how long a pause may hold the rollout before it is rolled back (default 24 h).
    """

    template_fields: Sequence[str] = ("rollout",)
    ui_color = "#f3e5f5"

    def __init__(
        self,
        *,
        rollout: Mapping[str, Any] | str,
        poll_interval: float = 5.0,
        max_wait_s: float = 600.0,
        timeout: float | None = None,
        deferrable: bool = conf.getboolean("operators", "default_deferrable", fallback=False),
        max_read_errors: int = 3,
        max_pause_s: float = 24 * 3600.0,
        mlflow_tracking_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.rollout = rollout
        self.poll_interval = poll_interval
        self.max_wait_s = max_wait_s
        self.timeout = timeout
        self.deferrable = deferrable
        self.max_read_errors = max_read_errors
        self.max_pause_s = max_pause_s
        self.mlflow_tracking_uri = mlflow_tracking_uri
        self._live: _Walk | None = None

    # -- the deploy task's XCom ------------------------------------------------------------------------------
    def _rollout(self) -> dict[str, Any]:
        if not isinstance(self.rollout, Mapping) or "handle" not in self.rollout:
            raise AirflowFailException(f"{self.task_id}: rollout must be the deploy task's XCom, got {self.rollout!r}")
        return dict(self.rollout)

    def _attach(self) -> _Walk:
        from airflow_llmops.platforms import deployment_platform

        rollout = self._rollout()
        handle = EndpointHandle.from_dict(rollout["handle"])
        try:
            platform = deployment_platform(
                str(rollout.get("platform") or handle.platform), **rollout["platform_kwargs"]
            )
        except ValueError as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        plan = RolloutPlan.parse(rollout["plan"])
        refused = platform.capabilities.refuse(plan, platform.name)
        if refused:
            raise AirflowFailException(f"{self.task_id}: {refused}")
        self._live = _Walk(rollout, platform, handle, plan)
        return self._live

    # -- Airflow entry points --------------------------------------------------------------------------------
    def execute(self, context: Context) -> Any:
        walk = self._attach()
        return self._guarded(lambda: self._start(context, walk))

    def execute_complete(self, context: Context, event: dict[str, Any]) -> Any:
        walk = self._attach()
        return self._guarded(lambda: self._resume(context, walk, event))

    def resume_execution(self, next_method: str, next_kwargs: dict[str, Any] | None, context: Context) -> Any:
        # A trigger that timed out or crashed resumes the task by raising here, before execute_complete: it must
        # roll back too.
        self._attach()
        resume = super().resume_execution
        return self._guarded(lambda: resume(next_method, next_kwargs, context))

    def on_kill(self) -> None:
        if self._live is not None:
            self._emergency_rollback("the task was killed")

    # -- the walk --------------------------------------------------------------------------------------------
    def _start(self, context: Context, walk: _Walk) -> dict[str, Any]:
        rollout, platform, handle, plan = walk
        new, model_uri = str(rollout["variant"]), str(rollout.get("model_uri"))
        record = platform.get_rollout_record(handle.endpoint_name)
        if record is not None and record.variant == new and record.model_uri == model_uri:
            if record.state == "succeeded":
                self.log.info("Rollout of %s already succeeded (%s); nothing left to do", new, record.message)
                return self._result(context, rollout, record)
            if not record.in_progress:
                raise AirflowFailException(
                    f"{self.task_id}: the rollout of {new} already ended as {record.state}: {record.message}. "
                    "Deploy the version again to start a new rollout."
                )
            record.attempts += 1
            self.log.warning(
                "Re-attaching to the rollout of %s recorded on endpoint %s (attempt %d): step %d of %s, "
                "weights before the rollout %s",
                new,
                handle.endpoint_name,
                record.attempts,
                record.step + 1,
                plan.steps(),
                record.previous,
            )
            platform.put_rollout_record(handle.endpoint_name, record)
            return self._advance(context, walk, record)
        if record is not None and record.in_progress:
            raise AirflowFailException(
                f"{self.task_id}: endpoint {handle.endpoint_name} has another rollout in progress ({record.variant}, "
                f"{record.rollout_id}); the deploy task rolls a stale one back before loading a new version"
            )
        previous = {str(k): float(v) for k, v in (handle.extra.get("previous") or {}).items()}
        now = time.time()
        record = RolloutRecord(
            rollout_id=f"{context['dag'].dag_id}/{context['run_id']}/{self.task_id}",
            variant=new,
            model_uri=model_uri,
            previous=previous,
            plan=plan.to_dict(),
            started_at=now,
        )
        if not previous:
            # The endpoint's first model took all traffic when it loaded: there is no other version to protect or
            # to compare with.
            record.state = "succeeded"
            record.message = f"{new}: first model of endpoint {handle.endpoint_name}, serving all traffic"
            platform.put_rollout_record(handle.endpoint_name, record)
            self.log.info(record.message)
            return self._result(context, rollout, record)
        platform.put_rollout_record(handle.endpoint_name, record)
        self.log.info(
            "Rollout of %s on endpoint %s: strategy %s, steps %s %%, bake %gs each; serving before: %s",
            new,
            handle.endpoint_name,
            plan.strategy,
            plan.steps(),
            plan.bake_seconds,
            previous,
        )
        return self._advance(context, walk, record)

    def _advance(self, context: Context, walk: _Walk, record: RolloutRecord) -> dict[str, Any]:
        from airflow_llmops.platforms.rollout import check_step, save_record, step_weights

        rollout, platform, handle, plan = walk
        # A guarded deployment is one step for us: the platform walks the plan's steps and judges them itself.
        steps = [100.0] if plan.native_guardrails else plan.steps()
        while True:
            if self.timeout is not None and time.time() - record.started_at > self.timeout:
                self._fail(walk, record, f"the rollout took longer than timeout={self.timeout:g}s")
            if record.step >= len(steps):
                return self._complete(context, walk, record)
            percent = steps[record.step]
            if record.step_started_at is None and plan.native_guardrails:
                from airflow_llmops.platforms.base import GuardedDeploymentPlatform

                assert isinstance(platform, GuardedDeploymentPlatform)
                platform.start_guarded_deployment(handle, variant=record.variant, plan=plan)
                record.step_started_at = time.time()
                save_record(platform, handle.endpoint_name, record)
                self.log.info(
                    "Guarded deployment of %s started on %s: the platform walks %s %% (bake %gs) and rolls back on its "
                    "alarms; watching it",
                    record.variant,
                    platform.name,
                    plan.steps(),
                    plan.bake_seconds,
                )
            elif record.step_started_at is None:
                weights = step_weights(plan, percent, record.variant, record.previous)
                platform.set_traffic(handle, weights)
                record.step_started_at = time.time()
                save_record(platform, handle.endpoint_name, record)
                self.log.info(
                    "Step %d/%d: %s at %g%%; traffic %s", record.step + 1, len(steps), record.variant, percent, weights
                )
            # Check before waiting: a step already decided (baked, or breached) must not defer, since a trigger
            # that fires at once races the scheduler (apache/airflow#71580).
            self._read_pause(walk, record)
            check = check_step(platform, handle, record, plan, max_wait_s=self.max_wait_s, max_pause_s=self.max_pause_s)
            if check.done:
                self._on_event(walk, record, check.to_event())
                continue
            if check.status == "paused":
                self.log.warning("Rollout of %s %s", record.variant, check.message)
            from airflow_llmops.triggers.rollout import RolloutStepTrigger

            trigger = RolloutStepTrigger(
                platform=platform.name,
                platform_kwargs=dict(rollout["platform_kwargs"]),
                handle=handle.to_dict(),
                record=record.to_dict(),
                poll_interval=self.poll_interval,
                max_wait_s=self.max_wait_s,
                max_read_errors=self.max_read_errors,
                max_pause_s=self.max_pause_s,
            )
            if not self.deferrable:  # the same wait, in the worker
                self._on_event(walk, record, asyncio.run(trigger.first_event()))
                continue
            left = None if self.timeout is None else max(1.0, self.timeout - (time.time() - record.started_at))
            self.defer(
                trigger=trigger,
                method_name="execute_complete",
                timeout=None if left is None else timedelta(seconds=left),
            )

    def _resume(self, context: Context, walk: _Walk, event: dict[str, Any]) -> dict[str, Any]:
        rollout, platform, handle, _ = walk
        new = str(rollout["variant"])
        record = platform.get_rollout_record(handle.endpoint_name)
        if record is None or record.variant != new:
            raise AirflowFailException(
                f"{self.task_id}: endpoint {handle.endpoint_name} has no rollout of {new} recorded"
            )
        if record.state == "succeeded":
            return self._result(context, rollout, record)
        if not record.in_progress:
            raise AirflowFailException(
                f"{self.task_id}: the rollout of {new} ended as {record.state}: {record.message}"
            )
        if event.get("step") != record.step:
            self.log.info(
                "Verdict for step %s arrived after the rollout moved to step %d; checking again",
                event.get("step"),
                record.step,
            )
        else:
            self._on_event(walk, record, event)
        return self._advance(context, walk, record)

    def _read_pause(self, walk: _Walk, record: RolloutRecord) -> RolloutRecord:
        """The pause state (and whether the rollout is still ours and in progress) from the endpoint's record."""
        stored = walk.platform.get_rollout_record(walk.handle.endpoint_name)
        if stored is None or stored.rollout_id != record.rollout_id or not stored.in_progress:
            state = "gone" if stored is None else f"{stored.state}: {stored.message}"
            raise AirflowFailException(f"{self.task_id}: the rollout of {record.variant} ended elsewhere ({state})")
        record.pause = stored.pause
        return stored

    def _on_event(self, walk: _Walk, record: RolloutRecord, event: dict[str, Any]) -> None:
        """A passed step moves the record on (unless a pause arrived meanwhile: the step holds); anything else
        ends the rollout (rolled back or left, as planned)."""
        from airflow_llmops.platforms.rollout import active_pause, pause_message, save_record

        platform, handle = walk.platform, walk.handle
        status = event.get("status")
        if status == "ended":  # rolled back (or ended) by someone else: the record says how; nothing to undo
            self._read_pause(walk, record)  # raises with the record's reason (still ours and in progress: go on)
            return
        if status == "passed" and active_pause(self._read_pause(walk, record)):
            self.log.warning(
                "Step %d passed, but the rollout is %s: holding it", record.step + 1, pause_message(record.pause or {})
            )
            return
        record.steps.append(event)
        if status == "passed":
            record.step += 1
            record.step_started_at = None
            save_record(platform, handle.endpoint_name, record)
            self.log.info("%s", event.get("message"))
            return
        self._fail(walk, record, str(event.get("message") or status))

    # -- endings ---------------------------------------------------------------------------------------------
    def _complete(self, context: Context, walk: _Walk, record: RolloutRecord) -> dict[str, Any]:
        from airflow_llmops.platforms.rollout import save_record

        rollout, platform, handle, plan = walk
        keep_new = plan.strategy != "shadow"
        platform.finish(handle, new_variant=record.variant, keep_new=keep_new)
        record.state = "succeeded"
        record.message = (
            f"{record.variant}: every step met the SLO; it serves all traffic, {sorted(record.previous)} unloaded"
            if keep_new
            else f"{record.variant}: the shadow met the SLO; removed, {sorted(record.previous)} serving as before"
        )
        save_record(platform, handle.endpoint_name, record)
        self.log.info("Rollout succeeded: %s", record.message)
        return self._result(context, rollout, record)

    def _fail(self, walk: _Walk, record: RolloutRecord, reason: str) -> NoReturn:
        from airflow_llmops.platforms.rollout import roll_back, save_record

        platform, handle, plan = walk.platform, walk.handle, walk.plan
        if plan.auto_rollback:
            message = f"{reason}; rolled back: {record.variant} removed, {record.previous} serving as before"
            roll_back(platform, handle, record, message)
        else:
            record.state = "failed"
            weights = platform.get_traffic(handle)
            record.message = f"{reason}; auto_rollback=False: left in place with traffic {weights}"
            self.log.warning("The plan says auto_rollback=False: the endpoint keeps traffic %s", weights)
            record.step_started_at = None
            save_record(platform, handle.endpoint_name, record)
        self.log.error("Rollout %s: %s", record.state, record.message)
        raise AirflowFailException(f"{self.task_id}: rollout {record.state}: {record.message}")

    def _guarded(self, step: Callable[[], T]) -> T:
        """Run ``step``; anything but a deferral or a verdict already acted on ends in the old weights."""
        try:
            return step()
        except (TaskDeferred, AirflowFailException):
            raise
        except BaseException as err:
            self._emergency_rollback(f"{type(err).__name__}: {err}")
            raise

    def _emergency_rollback(self, reason: str) -> None:
        if self._live is None:
            return
        walk = self._live
        platform, handle, new = walk.platform, walk.handle, str(walk.rollout["variant"])
        try:
            record = platform.get_rollout_record(handle.endpoint_name)
            if record is None or not record.in_progress or record.variant != new:
                return
            self._fail(walk, record, f"the rollout failed: {reason}")
        except AirflowFailException:
            pass
        except Exception as err:
            self.log.error(
                "Could not roll back %s on endpoint %s (%s: %s); the endpoint's record still says the rollout is in "
                "progress, so a retry or the next deploy rolls it back",
                new,
                handle.endpoint_name,
                type(err).__name__,
                err,
            )

    def _result(self, context: Context, rollout: dict[str, Any], record: RolloutRecord) -> dict[str, Any]:
        result: dict[str, Any] = {
            "state": record.state,
            "message": record.message,
            "steps": record.steps,
            "variant": record.variant,
            "url": rollout.get("url"),
            "model_uri": rollout.get("model_uri"),
        }
        plan = rollout["plan"]
        match = _VERSION.match(str(rollout.get("model_uri")))
        if match and plan.get("promote_on_success", True) and plan.get("strategy") != "shadow":
            result["promoted"] = self._promote(context, match["name"], match["version"])
        return result

    def _promote(self, context: Context, name: str, version: str) -> dict[str, Any]:
        from airflow_llmops.ml import registry

        tracking = self.mlflow_tracking_uri or default_mlflow_tracking_uri()
        reason = f"rolled out by {context['dag'].dag_id}/{context['run_id']}"
        if registry.current_version(name, "champion", tracking_uri=tracking) == version:
            record: dict[str, Any] = {"alias": "champion", "version": version, "previous": version}
        else:
            record = registry.move_alias(name, "champion", version, tracking_uri=tracking, reason=reason)
        for outlet in self.outlets:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = {"model": name, **record}
            elif isinstance(outlet, AssetAlias):  # the model is known only now (e.g. chosen by a Param)
                context["outlet_events"][outlet].add(model_alias_asset(name), extra={"model": name, **record})
        self.log.info("%s@champion -> version %s", name, version)
        return record
