"""The DAG the export tests run with dag.test(): a causal LM exported for edge runtimes, ONNX (KV cache, ONNX
Runtime) and GGUF (llama.cpp), each loaded back, checked and measured against fp32; model, dataset, GGUF type and
the perplexity tolerance as Params."""

from __future__ import annotations

from datetime import datetime

from airflow.sdk import DAG, Param

from airflow_llmops.operators import ExportModelOperator

with DAG(
    "llmops_test_export",
    schedule=None,
    start_date=datetime(2026, 1, 1),
    render_template_as_native_obj=True,
    default_args={"retries": 0},
    params={
        "model_uri": Param("", type="string"),
        "dataset_uri": Param("", type="string"),
        "gguf_type": Param("q8_0", type="string", enum=["f32", "f16", "q8_0"]),
        "max_quality_drop": Param(10.0, type="number"),
    },
) as export_dag:
    ExportModelOperator(
        task_id="export_onnx",
        model_uri="{{ params.model_uri }}",
        dataset_uri="{{ params.dataset_uri }}",
        target="onnx",
        onnx_int8=True,
        eval_rows=16,
        new_tokens=16,
        max_quality_drop="{{ params.max_quality_drop }}",  # type: ignore[arg-type]  # rendered as a number
        threads=1,
    )
    ExportModelOperator(
        task_id="export_gguf",
        model_uri="{{ params.model_uri }}",
        dataset_uri="{{ params.dataset_uri }}",
        target="gguf",
        gguf_type="{{ params.gguf_type }}",
        eval_rows=16,
        max_quality_drop="{{ params.max_quality_drop }}",  # type: ignore[arg-type]  # rendered as a number
        threads=1,
    )
