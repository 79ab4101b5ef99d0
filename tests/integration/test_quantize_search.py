"""The accuracy-aware search on a real fine-tuned MiniLM with one deliberately int8-hostile layer.

The fixture shifts the input of encoder layer 2's feed-forward block by +1000 on every channel (the attention
block's LayerNorm bias) and takes the shift out again right after (the first matmul's bias; the residual's LayerNorm
removes a constant by itself), so fp32 computes the same function. int8 cannot: an activation range that has to
reach 1000 (int8 ranges include 0) leaves steps of about 4 for values that differ by a few units, so that block's
output becomes noise that flows into every later layer, and int8 everywhere loses accuracy. The search must find
layer 2, keep it in fp32 and meet the tolerance the all-int8 model misses; the artifacts must load back in a fresh
process and in the model server.

Kept small for a 2-core machine: a 40-step classifier, 32 validation rows, one timed batch size.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import prepare_chatterbot, require_module, train_classifier

from airflow_llmops.ml.quantization import FP32, format_table, load_fp32, load_quantized
from airflow_llmops.ml.quantization.compare import ComparisonReport, compare
from airflow_llmops.specs import QuantizationSpec

require_module("onnxruntime")

SENSITIVE = "layer.2"
METHODS = ["onnx_static_int8", "torch_dynamic_int8"]
TEXTS = ["what is your name?", "do you like pizza?", "how much money do you make?", "are you a robot?"]


@pytest.fixture(scope="module")
def topics(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return prepare_chatterbot(tmp_path_factory.mktemp("data") / "topics")


@pytest.fixture(scope="module")
def sensitive(topics: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fine-tuned classifier whose layer 2 int8 cannot take: a shifted activation range (see the module doc)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    trained = train_classifier(tmp_path_factory.mktemp("job"), topics, steps=40)
    model = AutoModelForSequenceClassification.from_pretrained(str(trained)).eval()
    block, shift = model.bert.encoder.layer[2], 1000.0
    with torch.no_grad():
        block.attention.output.LayerNorm.bias += shift  # the feed-forward input, every channel + 1000 ...
        dense = block.intermediate.dense
        dense.bias -= shift * dense.weight.sum(dim=1)  # ... taken out by its first matmul: same function in fp32
    folder = tmp_path_factory.mktemp("sensitive") / "model"
    model.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(trained)).save_pretrained(str(folder))
    return folder


def _tolerance(topics: Path) -> float:
    """One validation row's worth of accuracy points, plus a hair: int8 may flip one row, not more."""
    import pandas as pd

    rows = len(pd.read_parquet(topics / "validation.parquet"))
    return 100 / rows + 0.01


@pytest.fixture(scope="module")
def report(sensitive: Path, topics: Path, tmp_path_factory: pytest.TempPathFactory) -> ComparisonReport:
    spec = QuantizationSpec(
        methods=METHODS,  # type: ignore[arg-type]
        accuracy_aware=True,
        max_quality_drop=_tolerance(topics),
        max_trials=12,
        calibration_method="minmax",  # percentile would clip the outlier; minmax shows what int8 costs
        calibration_rows=32,
        batch_sizes=[4],
        latency_repeats=2,
        threads=1,
    )
    return compare(sensitive, topics, spec, tmp_path_factory.mktemp("compare"))


@pytest.mark.parametrize("method", METHODS)
def test_search_keeps_the_sensitive_layer_in_fp32_and_meets_the_tolerance(
    report: ComparisonReport, method: str
) -> None:
    tolerance = report.decision.max_quality_drop
    row = report.row(method)
    assert row.ok, row.error
    search = json.loads((Path(row.artifact or "") / "quantization.json").read_text())["options"]["search"]
    first = search["trials"][0]
    assert first["step"] == "all-int8" and first["fp32_layers"] == []
    assert first["drop"] > tolerance, f"int8 everywhere should miss {tolerance:.2f} points: {search['summary']}"
    assert SENSITIVE in search["fp32_layers"], search["summary"]
    costs = search["layer_costs"]
    assert max(costs, key=costs.get) == SENSITIVE, costs  # the costliest layer is the one with the outlier
    assert search["met_tolerance"] and search["drop"] <= tolerance
    # The artifact as loaded and measured by compare (not the search's own trial) is within tolerance too.
    assert row.fp32_layers == search["fp32_layers"]
    assert row.quality_drop is not None and row.quality_drop <= tolerance
    assert row.search is not None and row.search["trials"] == len(search["trials"])
    # Honest reporting: the same model scored on the test split it was not tuned on.
    assert row.confirm_split == "test" and row.confirm_drop is not None and row.confirm_quality is not None
    assert len(search["trials"]) <= 12


def test_kept_layers_show_in_the_table_the_decision_and_the_artifact(report: ComparisonReport) -> None:
    table = format_table(report.rows)
    header = table.splitlines()[0]
    assert "fp32 layers" in header and "test drop" in header
    assert SENSITIVE in table
    assert report.decision.passed and report.decision.chosen in METHODS
    assert f"fp32 layers: {SENSITIVE}" in report.decision.message
    saved = json.loads((Path(report.out_root) / "comparison.json").read_text())
    assert saved["confirm_split"] == "test"
    assert {r["method"]: r["fp32_layers"] for r in saved["rows"]}[FP32] is None
    onnx = json.loads((Path(report.row("onnx_static_int8").artifact or "") / "quantization.json").read_text())
    assert onnx["options"]["calibration_method"] == "minmax"
    assert onnx["options"]["transformer_optimizer"]["applied"], onnx["options"]["transformer_optimizer"]
    assert onnx["size_bytes"] < 0.45 * report.row(FP32).size_bytes  # one of 6 blocks in fp32, the rest int8
    torch_meta = json.loads((Path(report.row("torch_dynamic_int8").artifact or "") / "quantization.json").read_text())
    assert "bert.encoder.layer.2.output.dense" in torch_meta["options"]["fp32_modules"]


def test_searched_artifacts_load_back_in_a_fresh_process_and_in_the_model_server(
    report: ComparisonReport, sensitive: Path
) -> None:
    script = (
        "import json, sys\n"
        "from pathlib import Path\n"
        "from airflow_llmops.ml.quantization import load_quantized\n"
        "from airflow_llmops.serving.models import load_model\n"
        "from airflow_llmops.serving.sources import ModelFolder\n"
        "texts = json.loads(sys.argv[1])\n"
        "out = {}\n"
        "for path in sys.argv[2:]:\n"
        "    p = load_quantized(path)\n"
        "    served = load_model(ModelFolder(source=path, path=Path(path), tokenizer_path=Path(path)))\n"
        "    labels = [c.label for c in served.classify(texts)]\n"
        "    out[p.method] = {'logits': p.logits(texts).tolist(), 'served': labels}\n"
        "print(json.dumps(out))\n"
    )
    paths = [str(report.row(m).artifact) for m in METHODS]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "LLMOPS_"))}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    result = subprocess.run(
        [sys.executable, "-c", script, json.dumps(TEXTS), *paths],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    fresh = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(fresh) == set(METHODS)

    import numpy as np

    fp32 = load_fp32(sensitive).predict(TEXTS)
    for method in METHODS:
        here = load_quantized(report.row(method).artifact or "")
        assert np.allclose(here.logits(TEXTS), np.asarray(fresh[method]["logits"]), atol=1e-4), method
        assert fresh[method]["served"] == here.predict(TEXTS)
        # With the outlier layer in fp32 the int8 model answers like fp32 on clear inputs.
        assert sum(a == b for a, b in zip(fresh[method]["served"], fp32, strict=True)) >= 3, method
