"""Edge exports of causal LMs (ONNX with a KV cache for ONNX Runtime, GGUF for llama.cpp), each loaded back,
checked against the source model and measured against fp32.

    report = export_model("job/model", "gguf", "out/gguf", gguf_type="q8_0", texts=held_out)
    report.check            # what the read-back compared
    report.size_ratio, report.perplexity_change_pct

No Airflow here: ``ExportModelOperator`` calls this (importing it lazily: it imports torch).
"""

from airflow_llmops.ml.export.core import REPORT_FILE, TARGETS, ExportCheckError, ExportReport, export_model

__all__ = ["REPORT_FILE", "TARGETS", "ExportCheckError", "ExportReport", "export_model"]
