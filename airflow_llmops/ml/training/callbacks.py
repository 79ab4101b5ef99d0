"""Progress reporting from inside the Trainer: ``progress.jsonl`` lines, a stdout line, per-step MLflow metrics.

Only the world's main process reports: the Trainer already averages the loss and sums the token count over all
ranks before it logs, so rank 0's view is the job's view.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from airflow_llmops.ml import hypertune
from airflow_llmops.ml.training.jobdir import ProgressWriter

MetricsSink = Callable[[int, Mapping[str, float | None]], None]


def _round(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


def _short(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k.removeprefix('eval_')} {v:.4g}" for k, v in sorted(metrics.items()) if "runtime" not in k)


class ProgressCallback(TrainerCallback):
    """Writes a progress record every ``logging_steps`` optimizer steps and one (``"final": true``) at the end.

    Rates and the ETA cover this attempt only (from the step it started or resumed at), so a resumed job
    does not report the earlier attempt's steps as if they had been done in no time.
    """

    def __init__(
        self,
        writer: ProgressWriter | None,
        *,
        samples_per_step: int,
        metrics_sink: MetricsSink | None = None,
        echo: Callable[[str], None] | None = None,
    ) -> None:
        self.writer = writer
        self.samples_per_step = samples_per_step
        self.metrics_sink = metrics_sink
        self.echo = echo or (lambda line: print(line, flush=True))
        self._t0 = time.monotonic()
        self._step0 = 0
        self._tokens0 = 0
        self._last_loss: float | None = None
        self._last_lr: float | None = None

    @property
    def start_step(self) -> int:
        return self._step0

    def tokens_this_attempt(self, state: TrainerState) -> int:
        return int(state.num_input_tokens_seen) - self._tokens0

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        # The Trainer has restored a checkpoint's state by now, so global_step is where this attempt starts.
        self._t0 = time.monotonic()
        self._step0 = state.global_step
        self._tokens0 = int(state.num_input_tokens_seen)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if not state.is_world_process_zero or not logs:
            return
        evaluation = {k: float(v) for k, v in logs.items() if k.startswith("eval_") and isinstance(v, int | float)}
        if evaluation:  # evaluation during training (eval_every_steps): the learning curve on validation
            self.echo(f"[train] step {state.global_step} validation: " + _short(evaluation))
            if self.metrics_sink is not None:
                self.metrics_sink(state.global_step, evaluation)
            try:  # a tuning trial's intermediate measurement (Vertex, Azure); the final one must succeed, not these
                hypertune.report(evaluation, state.global_step)
            except Exception as err:
                self.echo(f"[train] could not report step {state.global_step} to the tuning service: {err}")
        if "loss" not in logs:
            return
        self._last_loss = logs["loss"]
        self._last_lr = logs.get("learning_rate")
        self._emit(self.record(state, final=False))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.is_world_process_zero:
            self._emit(self.record(state, final=True))

    def record(self, state: TrainerState, *, final: bool) -> dict[str, Any]:
        elapsed = time.monotonic() - self._t0
        steps = state.global_step - self._step0
        tokens = self.tokens_this_attempt(state)
        eta = (state.max_steps - state.global_step) * elapsed / steps if steps > 0 else None
        return {
            "step": state.global_step,
            "total_steps": state.max_steps,
            "epoch": _round(state.epoch),
            "loss": _round(self._last_loss),
            "learning_rate": self._last_lr,
            "tokens_per_s": _round(tokens / elapsed if elapsed > 0 else None, 1),
            "samples_per_s": _round(steps * self.samples_per_step / elapsed if elapsed > 0 else None, 2),
            "eta_s": _round(0.0 if final else eta, 1),
            "elapsed_s": _round(elapsed, 2),
            "final": final,
        }

    def _emit(self, record: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write(record)
        eta = "-" if record["eta_s"] is None else f"{record['eta_s']:.0f}s"
        loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
        tps = "-" if record["tokens_per_s"] is None else f"{record['tokens_per_s']:.0f}"
        self.echo(
            f"[train] step {record['step']}/{record['total_steps']} loss {loss} tokens/s {tps} ETA {eta}"
            + (" (end)" if record["final"] else "")
        )
        if self.metrics_sink is not None and not record["final"]:
            metrics = {k: float(record[k]) for k in ("loss", "learning_rate", "tokens_per_s") if record[k] is not None}
            self.metrics_sink(int(record["step"]), metrics)
