"""Quantization of a real fine-tuned MiniLM: every CPU method saves an artifact that a fresh process loads and
serves, the comparison measures fp32 and each method on the validation split, and the gate decides on the numbers.

Kept small for a 2-core machine: a 40-step classifier, 30 evaluation rows, 3 timed batches per batch size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepare_chatterbot

from airflow_llmops.ml.quantization import (
    FP32,
    Measurement,
    QuantizationInputError,
    QuantizationUnavailable,
    UnsupportedTaskError,
    available_methods,
    compare,
    decide,
    format_table,
    load_fp32,
    load_quantized,
    method_availability,
    quantize_model,
    weights_size,
)
from airflow_llmops.ml.quantization.compare import eval_texts
from airflow_llmops.specs import QuantizationSpec, TrainingSpec

CPU_METHODS = [
    "torch_dynamic_int8",
    "torchao_int8_dynamic",
    "torchao_int8_weight_only",
    "onnx_dynamic_int8",
    "onnx_static_int8",
]
TEXTS = ["what is your name?", "do you like pizza?", "how much money do you make?", "are you a robot?"]
TIMEOUT = 300


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMOPS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env


def _train(tmp: Path, spec: TrainingSpec) -> Path:
    spec_file, job = tmp / "spec.json", tmp / "job"
    spec_file.write_text(spec.to_json(), encoding="utf-8")
    command = [sys.executable, "-m", "airflow_llmops.ml.train", "--spec", str(spec_file), "--job-dir", str(job)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT, env=_env(), check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    return job / "model"


@pytest.fixture(scope="module")
def topics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("data") / "topics", kind="classification")


@pytest.fixture(scope="module")
def classifier(topics: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MiniLM fine-tuned for ~2 epochs of the 4-topic set: good enough that quantization errors can show."""
    spec = TrainingSpec.parse(
        {
            "dataset_uri": str(topics),
            "max_steps": 40,
            "per_device_batch_size": 16,
            "max_seq_length": 32,
            "learning_rate": 2e-4,
            "checkpoint_every_steps": 1000,
            "log_every_steps": 20,
        }
    )
    return _train(tmp_path_factory.mktemp("classifier"), spec)


@pytest.fixture(scope="module")
def artifacts(classifier: Path, topics: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("artifacts")
    calibration = eval_texts(topics, "validation", 32)[0]  # static int8 calibrates its activation ranges on these
    return {m: Path(quantize_model(classifier, m, root / m, calibration_texts=calibration).path) for m in CPU_METHODS}


def test_cpu_methods_are_available_and_int4_needs_cuda() -> None:
    assert set(CPU_METHODS) <= set(available_methods())
    reasons = method_availability()
    assert set(reasons) == set(CPU_METHODS) | {"torchao_int4_weight_only"}
    import torch

    if not torch.cuda.is_available():
        assert "torchao_int4_weight_only" not in available_methods()
        assert "CUDA" in str(reasons["torchao_int4_weight_only"])


def test_int4_on_cpu_raises_a_clear_error(classifier: Path, tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: int4 is available")
    with pytest.raises(QuantizationUnavailable) as err:
        quantize_model(classifier, "torchao_int4_weight_only", tmp_path / "int4")
    message = str(err.value)
    assert "'torchao_int4_weight_only' is not available" in message and "CUDA" in message
    for method in CPU_METHODS:  # the alternatives that do run here
        assert method in message
    assert not (tmp_path / "int4").exists()


def test_artifacts_describe_themselves_and_shrink(classifier: Path, artifacts: dict[str, Path]) -> None:
    fp32_size = weights_size(classifier)
    for method, path in artifacts.items():
        meta = json.loads((path / "quantization.json").read_text())
        assert meta["method"] == method and meta["task"] == "classification"
        assert meta["source_model"] == str(classifier.resolve())
        assert meta["libraries"]["torch"] and meta["libraries"]["transformers"]
        assert meta["size_bytes"] == weights_size(path, meta["weights"])
        # Linear layers and the embedding tables in int8: about a quarter of fp32.
        assert meta["size_bytes"] < 0.3 * fp32_size, (method, meta["size_bytes"], fp32_size)
        assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert "onnx" in json.loads((artifacts["onnx_dynamic_int8"] / "quantization.json").read_text())["libraries"]


def test_every_method_loads_back_in_a_fresh_process(classifier: Path, artifacts: dict[str, Path]) -> None:
    script = (
        "import json, sys\n"
        "from airflow_llmops.ml.quantization import load_quantized\n"
        "texts = json.loads(sys.argv[1])\n"
        "out = {}\n"
        "for path in sys.argv[2:]:\n"
        "    p = load_quantized(path)\n"
        "    out[p.method] = {'labels': p.predict(texts), 'logits': p.logits(texts).tolist()}\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(artifacts[m]) for m in CPU_METHODS]
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(TEXTS), *paths],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(),
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    served = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(served) == set(CPU_METHODS)

    import numpy as np

    fp32 = load_fp32(classifier)
    reference = fp32.logits(TEXTS)
    for method in CPU_METHODS:
        labels, logits = served[method]["labels"], np.asarray(served[method]["logits"])
        assert len(labels) == len(TEXTS) and set(labels) <= set(fp32.labels)
        assert logits.shape == reference.shape
        # int8 weights move logits a little, not to another model: same ranking of classes on clear inputs.
        assert np.abs(logits - reference).max() < 0.5, (method, logits, reference)
        # The fresh process serves what this process serves.
        here = load_quantized(artifacts[method]).logits(TEXTS)
        assert np.allclose(here, logits, atol=1e-4), method


@pytest.fixture(scope="module")
def report(classifier: Path, topics: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    spec = QuantizationSpec(
        methods=["torch_dynamic_int8", "onnx_dynamic_int8", "torchao_int4_weight_only"],
        choose="fastest_within_tolerance",
        max_quality_drop=5.0,
        batch_sizes=[1, 8],
        latency_repeats=3,
        max_eval_rows=30,
        threads=1,
    )
    return compare(classifier, topics, spec, tmp_path_factory.mktemp("compare"))


def test_compare_measures_fp32_and_every_method(report) -> None:  # type: ignore[no-untyped-def]
    assert [r.method for r in report.rows] == [
        FP32,
        "torch_dynamic_int8",
        "onnx_dynamic_int8",
        "torchao_int4_weight_only",
    ]
    assert report.eval_rows == 30 and report.threads == 1 and report.split == "validation"
    fp32 = report.row(FP32)
    assert fp32.quality["accuracy"] > 0.5, "the fixture classifier should have learned something"
    for row in report.rows[:3]:
        assert row.ok and row.rows == 30 and row.threads == 1
        assert set(row.latency_ms) == {1, 8} and 0 < row.latency_ms[1]["p50"] <= row.latency_ms[1]["p95"]
        assert row.throughput_batch == 8 and row.throughput_rows_s > 0
        assert 0 <= row.quality["accuracy"] <= 1 and 0 <= row.quality["macro_f1"] <= 1
        expected = (fp32.quality["accuracy"] - row.quality["accuracy"]) * 100
        assert row.quality_drop == pytest.approx(expected)
    assert report.row("torch_dynamic_int8").size_ratio < 0.3
    int4 = report.row("torchao_int4_weight_only")
    assert not int4.ok and "CUDA" in (int4.error or "")

    saved = json.loads((Path(report.out_root) / "comparison.json").read_text())
    assert saved["decision"] == report.decision.to_dict() and len(saved["rows"]) == 4

    table = format_table(report.rows)
    assert all(m in table for m in ("fp32", "torch_dynamic_int8", "onnx_dynamic_int8", "did not run"))
    assert len({len(line) for line in table.splitlines()[:3]}) == 1  # fixed width


def test_real_gate_decision_follows_the_measured_drops(report) -> None:  # type: ignore[no-untyped-def]
    ran = [r for r in report.rows[1:] if r.ok]
    within = [r for r in ran if r.quality_drop <= 5.0]
    decision = report.decision
    assert decision.passed == bool(within)
    assert decision.chosen == (max(within, key=lambda r: r.throughput_rows_s).method if within else None)
    assert decision.drops["torchao_int4_weight_only"] is None
    assert "max_quality_drop=5" in decision.message and "did not run: torchao_int4_weight_only" in decision.message


def _with_drop(row: Measurement, fp32: Measurement, drop: float) -> Measurement:
    """The measured row, with accuracy ``drop`` points below fp32 (other numbers as measured)."""
    quality = {**row.quality, "accuracy": fp32.quality["accuracy"] - drop / 100}
    return dataclasses.replace(row, quality=quality, quality_drop=drop)


def test_gate_fails_at_zero_tolerance_on_any_drop(report) -> None:  # type: ignore[no-untyped-def]
    fp32, dynamic, onnx = (report.row(m) for m in (FP32, "torch_dynamic_int8", "onnx_dynamic_int8"))
    one_row = 100 / report.eval_rows
    # One more misclassified row than measured: a drop whatever the measurement gave.
    worse = _with_drop(dynamic, fp32, max(dynamic.quality_drop or 0, 0) + one_row)
    rows = [fp32, worse, onnx]
    methods = ["torch_dynamic_int8", "onnx_dynamic_int8"]

    strict = decide(rows, QuantizationSpec(methods=methods, choose="all_must_pass", max_quality_drop=0))
    assert not strict.passed
    assert "gate failed (max_quality_drop=0 points)" in strict.message
    assert f"fp32 accuracy {fp32.quality['accuracy']:.4f}" in strict.message
    assert f"over tolerance: torch_dynamic_int8 accuracy {worse.quality['accuracy']:.4f}" in strict.message
    assert f"(drop {worse.quality_drop:+.2f})" in strict.message

    enough = max(worse.quality_drop or 0, onnx.quality_drop or 0)
    tolerant = decide(rows, QuantizationSpec(methods=methods, choose="all_must_pass", max_quality_drop=enough))
    assert tolerant.passed and tolerant.chosen in methods  # the bound is inclusive
    assert tolerant.message.startswith("all 2 methods within")


def test_fastest_within_tolerance_skips_a_faster_method_that_lost_quality(report) -> None:  # type: ignore[no-untyped-def]
    fp32, dynamic, onnx = (report.row(m) for m in (FP32, "torch_dynamic_int8", "onnx_dynamic_int8"))
    one_row = 100 / report.eval_rows
    fast, slow = sorted([dynamic, onnx], key=lambda r: r.throughput_rows_s, reverse=True)
    tolerance = max(slow.quality_drop or 0, 0)
    fast = _with_drop(fast, fp32, tolerance + one_row)
    spec = QuantizationSpec(
        methods=[fast.method, slow.method], choose="fastest_within_tolerance", max_quality_drop=tolerance
    )
    decision = decide([fp32, fast, slow], spec)
    assert decision.passed and decision.chosen == slow.method
    assert f"over tolerance: {fast.method}" in decision.message

    both_over = [fp32, fast, _with_drop(slow, fp32, tolerance + one_row)]
    none = decide(both_over, spec)
    assert not none.passed and none.chosen is None and none.message.startswith("no method within")


def test_missing_model_folder_is_a_clear_error(tmp_path: Path, topics: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(QuantizationInputError, match=re.escape(f"model folder {missing} does not exist")):
        quantize_model(missing, "torch_dynamic_int8", tmp_path / "out")
    with pytest.raises(QuantizationInputError, match="does not exist"):
        compare(missing, topics, QuantizationSpec(), tmp_path / "out")
    with pytest.raises(QuantizationInputError, match=r"no quantization\.json"):
        load_quantized(tmp_path)


def test_labels_unknown_to_the_model_are_a_clear_error(
    classifier: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    other = prepare_chatterbot(tmp_path_factory.mktemp("data") / "other", topics="ai,sports,science")
    out = tmp_path_factory.mktemp("unknown-labels")
    with pytest.raises(QuantizationInputError, match=r"labels the model .* does not know: \['science', 'sports'\]"):
        compare(classifier, other, QuantizationSpec(max_eval_rows=50), out)
    assert not any(out.iterdir()), "nothing is quantized before the input is checked"


def test_unknown_method_and_foreign_out_dir_are_refused(classifier: Path, tmp_path: Path) -> None:
    with pytest.raises(QuantizationInputError, match="unknown quantization method 'gptq'"):
        quantize_model(classifier, "gptq", tmp_path / "out")
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(QuantizationInputError, match="not an earlier quantization artifact"):
        quantize_model(classifier, "torch_dynamic_int8", foreign)
    assert (foreign / "notes.txt").read_text() == "keep me"


def test_causal_lm_quality_is_perplexity(tmp_path_factory: pytest.TempPathFactory) -> None:
    dialog = prepare_chatterbot(tmp_path_factory.mktemp("data") / "dialog", kind="dialog")
    spec = TrainingSpec.parse(
        {
            "task": "causal_lm",
            "dataset_uri": str(dialog),
            "max_steps": 5,
            "per_device_batch_size": 8,
            "max_seq_length": 32,
            "checkpoint_every_steps": 1000,
        }
    )
    model = _train(tmp_path_factory.mktemp("lm"), spec)
    out = tmp_path_factory.mktemp("lm-quant")
    with pytest.raises(UnsupportedTaskError, match="classification models only"):
        quantize_model(model, "onnx_static_int8", out / "onnx", calibration_texts=["hello there"])
    quant = QuantizationSpec(
        methods=["torch_dynamic_int8"], latency_repeats=2, max_eval_rows=20, batch_sizes=[2], threads=1
    )
    result = compare(model, dialog, quant, out)
    fp32, int8 = result.rows
    assert fp32.quality["perplexity"] > 1 and int8.quality["perplexity"] > 1
    assert int8.quality_drop == pytest.approx((int8.quality["perplexity"] / fp32.quality["perplexity"] - 1) * 100)
    assert result.decision.metric == "perplexity" and "perplexity" in format_table(result.rows)
    assert int8.artifact is not None
    with pytest.raises(UnsupportedTaskError):
        load_quantized(int8.artifact).predict(["hello"])
