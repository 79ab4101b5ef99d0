"""The accuracy-aware search's decisions, on made-up per-layer costs: which layers it keeps in fp32, what it
records, and that its budget holds. No model here: ``tests/integration/test_quantize_search.py`` runs it on one."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from airflow_llmops.ml.quantization.errors import QuantizationInputError
from airflow_llmops.ml.quantization.layers import group_order, layer_group
from airflow_llmops.ml.quantization.search import Score, search_layers
from airflow_llmops.specs import QuantizationSpec, SpecValidationError

GROUPS = ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3", "head"]


def additive(costs: dict[str, float], calls: list[list[str]] | None = None) -> Callable[[list[str]], Score]:
    """A model whose int8 drop is the sum of its quantized layers' costs (divergence: the same, scaled)."""

    def evaluate(fp32_layers: list[str]) -> Score:
        if calls is not None:
            calls.append(list(fp32_layers))
        drop = sum(cost for group, cost in costs.items() if group not in fp32_layers)
        return Score(drop=drop, divergence=drop / 100, quality={"accuracy": 0.9 - drop / 100})

    return evaluate


def test_int8_everywhere_within_tolerance_is_one_trial() -> None:
    calls: list[list[str]] = []
    result = search_layers(
        GROUPS, additive({"layer.1": 0.3}, calls), max_quality_drop=1.0, max_trials=10, max_seconds=60
    )
    assert calls == [[]]
    assert result.fp32_layers == [] and result.met_tolerance and result.drop == pytest.approx(0.3)
    assert "int8 everywhere is within tolerance" in result.summary


def test_one_sensitive_layer_is_found_and_kept_in_fp32() -> None:
    costs = {"layer.2": 4.0, "layer.0": 0.2, "head": 0.1}
    result = search_layers(GROUPS, additive(costs), max_quality_drop=1.0, max_trials=20, max_seconds=60)
    assert result.fp32_layers == ["layer.2"]
    assert result.met_tolerance and result.drop == pytest.approx(0.3)
    assert result.all_int8_drop == pytest.approx(4.3)
    assert result.layer_costs["layer.2"] == pytest.approx(4.0)
    assert result.layer_costs["layer.1"] == 0
    assert [t.step for t in result.trials] == ["all-int8"] + ["sensitivity"] * len(GROUPS)
    assert "layer.2 (costs +4.00)" in result.summary
    assert result.to_dict()["summary"] == result.summary


def test_several_layers_go_back_to_fp32_costliest_first() -> None:
    costs = {"layer.1": 1.5, "layer.3": 1.0, "embeddings": 0.6, "layer.0": 0.1}
    result = search_layers(GROUPS, additive(costs), max_quality_drop=0.8, max_trials=20, max_seconds=60)
    assert result.fp32_layers == ["layer.1", "layer.3"]  # 0.7 left: within 0.8
    assert result.met_tolerance
    assert result.trials[-1].step == "fallback"
    assert "2 costliest" in result.stopped


def test_the_trial_budget_ends_the_search_with_the_best_found() -> None:
    costs = {"layer.3": 5.0, "layer.0": 0.5}
    result = search_layers(GROUPS, additive(costs), max_quality_drop=1.0, max_trials=3, max_seconds=60)
    assert len(result.trials) == 3
    assert not result.met_tolerance
    assert "max_trials=3" in result.stopped
    assert result.fp32_layers == ["layer.0"]  # the best of the three measured (layer.3 was never tried)


def test_the_time_budget_is_checked_before_each_trial() -> None:
    now = [0.0]

    def clock() -> float:
        return now[0]

    def slow(fp32_layers: list[str]) -> Score:
        now[0] += 10
        return Score(drop=3.0, divergence=0.1)

    result = search_layers(GROUPS, slow, max_quality_drop=1.0, max_trials=50, max_seconds=25, clock=clock)
    assert len(result.trials) == 3  # started at 0, 10, 20 s; none at 30
    assert "max_search_s=25" in result.stopped


def test_nothing_to_keep_when_no_layer_helps() -> None:
    def flat(fp32_layers: list[str]) -> Score:
        return Score(drop=2.0, divergence=0.5)

    result = search_layers(GROUPS, flat, max_quality_drop=1.0, max_trials=50, max_seconds=60)
    assert not result.met_tolerance and result.fp32_layers == []
    assert len(result.trials) == 1 + len(GROUPS)  # no fallback trial: no layer lowered anything
    assert "no choice of layers" in result.stopped


def test_a_bad_budget_is_refused() -> None:
    with pytest.raises(QuantizationInputError, match="max_trials >= 1"):
        search_layers(GROUPS, additive({}), max_quality_drop=1.0, max_trials=0, max_seconds=60)


@pytest.mark.parametrize(
    ("path", "group"),
    [
        ("model.bert.encoder.layer.3.attention.self.query", "layer.3"),
        ("bert.encoder.layer.11.output.dense", "layer.11"),
        ("transformer.h.0.mlp.c_fc", "layer.0"),
        ("model.bert.embeddings.word_embeddings.weight", "embeddings"),
        ("transformer.wte", "embeddings"),
        ("classifier", "head"),
        ("bert.pooler.dense", "head"),
    ],
)
def test_layer_groups_of_module_paths(path: str, group: str) -> None:
    assert layer_group(path) == group


def test_groups_are_in_model_order() -> None:
    assert group_order(["head", "layer.10", "layer.2", "embeddings", "layer.2"]) == [
        "embeddings",
        "layer.2",
        "layer.10",
        "head",
    ]


def test_spec_takes_the_search_and_calibration_options() -> None:
    spec = QuantizationSpec.parse(
        {
            "methods": ["onnx_static_int8", "torch_dynamic_int8"],
            "accuracy_aware": True,
            "max_trials": 5,
            "max_search_s": 120,
            "calibration_rows": 64,
            "calibration_method": "MinMax",
        }
    )
    assert spec.calibration_method == "minmax" and spec.accuracy_aware and spec.max_trials == 5
    assert QuantizationSpec.from_json(spec.to_json()) == spec
    assert not QuantizationSpec().accuracy_aware  # opt-in; the reference pipeline turns it on
    with pytest.raises(SpecValidationError, match="calibration_method"):
        QuantizationSpec.parse({"calibration_method": "kl"})
    with pytest.raises(SpecValidationError, match="max_trials"):
        QuantizationSpec.parse({"max_trials": 0})
