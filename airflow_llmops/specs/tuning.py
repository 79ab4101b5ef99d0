"""Hyper-parameter search spec: a base training spec, a search space over its fields, and the study's budget."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator
from typing_extensions import Self

from airflow_llmops.specs.base import Spec
from airflow_llmops.specs.training import TrainingSpec

# Metrics where lower is better; any other metric is maximised unless ``direction`` says otherwise.
_LOWER_IS_BETTER = ("loss", "perplexity")


class ParamRange(Spec):
    """One dimension of the search: ``float``/``int`` between ``low`` and ``high`` (optionally log-scaled,
    ``step`` for a grid), or ``categorical`` over ``choices``."""

    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(default=None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical range needs a non-empty 'choices' list")
            return self
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} range needs 'low' and 'high'")
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs low > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("'step' and 'log' cannot be combined")
        return self


def _training_field(path: str) -> bool:
    """``learning_rate`` or ``lora.r``: a field of TrainingSpec (or of one of its nested specs)."""
    model: Any = TrainingSpec
    for part in path.split("."):
        fields = getattr(model, "model_fields", None)
        if fields is None or part not in fields:
            return False
        annotation = fields[part].annotation
        nested = [a for a in getattr(annotation, "__args__", (annotation,)) if hasattr(a, "model_fields")]
        model = nested[0] if nested else None
    return True


class TuningSpec(Spec):
    """An Optuna study over :class:`TrainingSpec` fields.

    Each trial is one training run of ``training`` with the sampled values, evaluated every ``eval_every_steps``
    on the validation split; ``metric`` (an evaluation metric such as ``eval_accuracy``, ``eval_macro_f1`` or
    ``eval_loss``) is reported to the pruner, which stops unpromising trials early. ``initial_trials`` are run
    first, as given (known-good settings to compare against).
    """

    training: TrainingSpec = Field(default_factory=TrainingSpec)
    search_space: dict[str, ParamRange] = Field(min_length=1)
    n_trials: int = Field(default=10, ge=1, le=10_000)
    timeout_s: float | None = Field(default=None, gt=0)
    metric: str = Field(default="eval_accuracy", pattern=r"^eval_[a-z0-9_]+$")
    direction: Literal["auto", "maximize", "minimize"] = "auto"
    sampler: Literal["tpe", "random"] = "tpe"
    pruner: Literal["median", "none"] = "median"
    pruner_startup_trials: int = Field(default=2, ge=0)
    eval_every_steps: int = Field(default=20, ge=1)
    initial_trials: list[dict[str, Any]] = Field(default_factory=list)
    seed: int = 0

    @model_validator(mode="after")
    def _known_fields(self) -> Self:
        unknown = sorted(k for k in self.search_space if not _training_field(k))
        if unknown:
            raise ValueError(f"search_space names {unknown}, which are not TrainingSpec fields (e.g. learning_rate)")
        for trial in self.initial_trials:
            extra = sorted(set(trial) - set(self.search_space))
            if extra:
                raise ValueError(f"initial trial {trial} sets {extra}, outside the search space")
        if self.training.distributed.nnodes > 1:
            raise ValueError("trials run on one host; distributed.nnodes must be 1")
        return self

    @property
    def resolved_direction(self) -> Literal["maximize", "minimize"]:
        if self.direction != "auto":
            return self.direction
        return "minimize" if any(word in self.metric for word in _LOWER_IS_BETTER) else "maximize"

    def trial_training(self, params: dict[str, Any]) -> TrainingSpec:
        """The training spec of one trial: ``training`` with ``params`` (dotted keys for nested fields) set."""
        data = self.training.to_dict()
        for key, value in params.items():
            target = data
            *parents, leaf = key.split(".")
            for part in parents:
                if not isinstance(target.get(part), dict):  # e.g. ``lora: null`` becomes LoRA with defaults
                    target[part] = {}
                target = target[part]
            target[leaf] = value
        return TrainingSpec.parse(data)
