"""The typed specs: defaults are valid, every spec round-trips through JSON, bad values are named."""

from __future__ import annotations

import json

import pytest

from airflow_llmops.specs import (
    SLO,
    DatasetSpec,
    DistributedSpec,
    DriftPolicy,
    LoraSpec,
    QuantizationSpec,
    RolloutPlan,
    SpecValidationError,
    SplitSpec,
    TrainingSpec,
)

EXAMPLES = [
    DatasetSpec(name="topics", source="chatterbot://english"),
    DatasetSpec(
        name="support-tickets",
        source="s3://bucket/tickets.parquet",
        conn_id="aws_default",
        split=SplitSpec(train=0.7, validation=0.15, test=0.15, salt="v2"),
        near_duplicate_threshold=0.8,
    ),
    DatasetSpec(name="chat", source="file:///data/chat.jsonl", task="causal_lm", label_field=None),
    TrainingSpec(),
    TrainingSpec(
        task="causal_lm",
        model="/models/gpt",
        lora=LoraSpec(r=4, target_modules=["c_attn"]),
        distributed=DistributedSpec(nproc_per_node=2, nnodes=2, rdzv_endpoint="127.0.0.1:29500"),
        precision="bf16",
    ),
    QuantizationSpec(methods=["torch_dynamic_int8", "onnx_dynamic_int8"], max_quality_drop=0.5),
    RolloutPlan(strategy="canary", traffic_steps=[10, 50, 100], slo=SLO(p95_latency_ms=200, max_latency_ratio=1.5)),
    RolloutPlan(strategy="shadow", shadow_percent=20),
    DriftPolicy(checks=["embeddings", "latency"], min_drifted_checks=2, cooldown_hours=6),
]


@pytest.mark.parametrize("spec", EXAMPLES, ids=lambda s: type(s).__name__)
def test_round_trips_through_json(spec):
    text = spec.to_json()
    assert json.loads(text) == spec.to_dict()
    assert type(spec).from_json(text) == spec
    assert type(spec).parse(spec.to_dict()) == spec


def test_defaults_are_valid_and_resolve():
    assert TrainingSpec().resolved_model == "all-MiniLM-L6-v2"
    assert TrainingSpec(task="causal_lm").resolved_model == "tiny-gpt2"
    assert DatasetSpec(name="x", source="file:///d/x.csv").resolved_format == "csv"
    assert DatasetSpec(name="x", source="/d/x.parquet").source == "file:///d/x.parquet"


def _error(spec_cls, **kwargs) -> str:
    with pytest.raises(SpecValidationError) as info:
        spec_cls.parse(kwargs)
    return str(info.value)


def test_errors_name_the_field_and_the_bad_value():
    msg = _error(TrainingSpec, learning_rate=-0.5)
    assert "TrainingSpec.learning_rate" in msg and "got -0.5" in msg
    msg = _error(DatasetSpec, name="x", source="ftp://host/x.csv")
    assert "DatasetSpec.source" in msg and "ftp" in msg and "s3" in msg
    msg = _error(TrainingSpec, distributed={"nnodes": 2})
    assert "rdzv_endpoint" in msg
    msg = _error(TrainingSpec, distributed={"nproc_per_node": 0})
    assert "nproc_per_node" in msg and "0" in msg


def test_every_problem_is_reported_at_once():
    with pytest.raises(SpecValidationError) as info:
        TrainingSpec.parse({"epochs": 0, "per_device_batch_size": 0, "precision": "int3"})
    fields = " ".join(info.value.problems)
    for name in ("epochs", "per_device_batch_size", "precision"):
        assert f"TrainingSpec.{name}" in fields
    assert "'int3'" in fields


def test_unknown_keys_are_rejected_not_ignored():
    msg = _error(TrainingSpec, learning_rte=0.1)
    assert "TrainingSpec.learning_rte" in msg and "Extra inputs" in msg


def test_split_must_sum_to_one():
    msg = _error(SplitSpec, train=0.8, validation=0.3, test=0.1)
    assert "sum to 1" in msg and "1.2" in msg


@pytest.mark.parametrize(
    ("plan", "fragment"),
    [
        ({"strategy": "canary"}, "needs traffic_steps"),
        ({"strategy": "canary", "traffic_steps": [10, 50]}, "end at 100"),
        ({"strategy": "canary", "traffic_steps": [50, 10, 100]}, "increase strictly"),
        ({"strategy": "canary", "traffic_steps": [0, 100]}, "(0, 100]"),
        ({"strategy": "blue_green", "traffic_steps": [100]}, "takes no traffic_steps"),
        ({"strategy": "rainbow", "traffic_steps": [10, 100]}, "RolloutPlan.strategy"),
        ({"traffic_steps": [10, 100], "slo": {"max_error_rate": 2}}, "RolloutPlan.slo.max_error_rate"),
    ],
)
def test_rollout_plan_rejects_inconsistent_steps(plan, fragment):
    assert fragment in _error(RolloutPlan, **plan)


def test_rollout_steps_per_strategy():
    assert RolloutPlan(strategy="canary", traffic_steps=[5, 25, 100]).steps() == [5, 25, 100]
    assert RolloutPlan(strategy="linear", linear_step_percent=30).steps() == [30, 60, 90, 100]
    assert RolloutPlan(strategy="blue_green").steps() == [100]
    assert RolloutPlan(strategy="all_at_once").steps() == [100]
    assert RolloutPlan(strategy="shadow", shadow_percent=10).steps() == [10]


def test_drift_policy_consistency():
    assert "min_drifted_checks=3" in _error(DriftPolicy, checks=["latency", "prediction"], min_drifted_checks=3)
    assert "sample_size" in _error(DriftPolicy, min_rows=500, sample_size=100)


def test_quantization_rejects_duplicates_and_unknown_methods():
    assert "more than once" in _error(QuantizationSpec, methods=["torch_dynamic_int8", "torch_dynamic_int8"])
    assert "QuantizationSpec.methods.0" in _error(QuantizationSpec, methods=["gptq_2bit"])


def test_parse_accepts_json_and_overrides_and_rejects_garbage():
    spec = TrainingSpec.parse('{"epochs": 2}', learning_rate=1e-3)
    assert (spec.epochs, spec.learning_rate) == (2, 1e-3)
    for garbage, fragment in (("{epochs: 2", "not valid JSON"), ("[1, 2]", "JSON object"), (3, "got int")):
        with pytest.raises(SpecValidationError, match=fragment):
            TrainingSpec.parse(garbage)


def test_specs_are_immutable():
    spec = TrainingSpec()
    with pytest.raises(Exception, match="frozen"):
        spec.epochs = 3  # type: ignore[misc]


def test_tuning_spec_checks_its_search_space_and_builds_trial_specs():
    from airflow_llmops.specs import TuningSpec

    spec = TuningSpec.parse(
        {
            "search_space": {
                "learning_rate": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                "lora.r": {"type": "categorical", "choices": [4, 8]},
            },
            "metric": "eval_loss",
        }
    )
    assert spec.resolved_direction == "minimize"
    trial = spec.trial_training({"learning_rate": 2e-4, "lora.r": 4})
    assert trial.learning_rate == 2e-4 and trial.lora is not None and trial.lora.r == 4
    assert TuningSpec.from_json(spec.to_json()) == spec
    with pytest.raises(SpecValidationError, match=r"\['learning_rte'\], which are not TrainingSpec fields"):
        TuningSpec.parse({"search_space": {"learning_rte": {"type": "float", "low": 0.1, "high": 0.2}}})
    with pytest.raises(SpecValidationError, match="log-scaled range needs low > 0"):
        TuningSpec.parse({"search_space": {"learning_rate": {"type": "float", "low": 0, "high": 0.2, "log": True}}})
    with pytest.raises(SpecValidationError, match="outside the search space"):
        TuningSpec.parse(
            {
                "search_space": {"learning_rate": {"type": "float", "low": 0.1, "high": 0.2}},
                "initial_trials": [{"epochs": 2}],
            }
        )
    with pytest.raises(SpecValidationError, match="learning_rate"):  # a sampled value the training spec refuses
        spec.trial_training({"learning_rate": 5.0})


def test_drift_policy_defaults_are_the_measured_policy():
    policy = DriftPolicy()
    assert policy.embedding_method == "mmd" and policy.embedding_cutoff == 0.0015
    assert policy.descriptor_method == "wasserstein" and policy.descriptor_threshold == 0.3
    assert policy.checks_to_agree == 2 and policy.min_drifted_checks is None
    assert DriftPolicy(checks=["latency"]).checks_to_agree == 1  # a single check decides alone
    assert DriftPolicy(embedding_method="model").embedding_cutoff == 0.55  # each method its own scale
    assert DriftPolicy(embedding_method="model", embedding_threshold=0.6).embedding_cutoff == 0.6
    assert DriftPolicy.parse(policy.to_json()) == policy
