"""ExportModelOperator: export a causal LM for an edge runtime (ONNX with a KV cache, GGUF), check and measure it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.operators.base import LLMOpsBaseOperator, local_folder, staged_output
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    from airflow.sdk import Context

TARGETS = ("onnx", "gguf")
GGUF_TYPES = ("f32", "f16", "q8_0")


class ExportModelOperator(LLMOpsBaseOperator):
    """Export the causal LM at ``model_uri`` to ``target``, load the export back, check it and measure it.

    - ``onnx``: one ONNX graph for ONNX Runtime with the KV cache as inputs (``past.N.key/value``) and outputs
      (``present.N.key/value``), fp32 or with ``onnx_int8`` dynamic int8 weights. Checked in ONNX Runtime: fp32
      logits match torch's and greedy decoding with the cache gives torch's tokens.
    - ``gguf``: a llama.cpp file (architecture ``gpt2``, tokenizer included) in ``gguf_type`` ``f32``, ``f16`` or
      ``q8_0``. Checked by reading it back with ``gguf.GGUFReader``: every tensor against the source weights, the
      tokenizer metadata, and the logits of llama.cpp's GPT-2 graph computed from the read-back tensors.

    Both measure the size against the fp32 weights and the perplexity change on the first ``eval_rows`` rows of
    ``dataset_uri``'s validation split (a few built-in sentences without a dataset), and fail the task when it is
    over ``max_quality_drop`` percent; ``onnx`` also measures greedy tokens/s at batch 1 against torch fp32. The
    export and its ``export.json`` report go to ``<artifact_root>/<dag>/<run>/exports/<task_id>``; XCom gets a
    summary with ``export_uri``. Supported: GPT-2 (``GPT2LMHeadModel``); other architectures fail with a message
    naming it.

    :param model_uri: saved causal LM folder (the training task's ``model_uri``; templated).
    :param target: ``onnx`` or ``gguf`` (templated).
    :param dataset_uri: prepared dataset whose validation split the perplexity is measured on (templated).
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "model_uri",
        "target",
        "dataset_uri",
        "gguf_type",
        "max_quality_drop",
    )
    ui_color = "#e8eaf6"

    def __init__(
        self,
        *,
        model_uri: str,
        target: str = "onnx",
        dataset_uri: str | None = None,
        gguf_type: str = "f16",
        onnx_int8: bool = False,
        eval_rows: int = 32,
        new_tokens: int = 32,
        max_quality_drop: float = 10.0,
        threads: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.model_uri = model_uri
        self.target = target
        self.dataset_uri = dataset_uri
        self.gguf_type = gguf_type
        self.onnx_int8 = onnx_int8
        self.eval_rows = eval_rows
        self.new_tokens = new_tokens
        self.max_quality_drop = max_quality_drop
        self.threads = threads

    def _check_arguments(self) -> None:
        if self.target not in TARGETS:
            raise AirflowFailException(f"{self.task_id}: unknown target {self.target!r}; choose one of {list(TARGETS)}")
        if self.target == "gguf" and self.gguf_type not in GGUF_TYPES:
            raise AirflowFailException(
                f"{self.task_id}: unknown gguf_type {self.gguf_type!r}; choose one of {list(GGUF_TYPES)}"
            )
        if self.eval_rows < 1 or self.new_tokens < 1:
            raise AirflowFailException(
                f"{self.task_id}: eval_rows and new_tokens must be >= 1, got {self.eval_rows} and {self.new_tokens}"
            )

    def execute(self, context: Context) -> dict[str, Any]:
        self._check_arguments()
        from airflow_llmops.ml.export import export_model
        from airflow_llmops.ml.quantization import QuantizationError

        model_dir = self.stage_in(str(self.model_uri), "model")
        texts: list[str] = []
        if self.dataset_uri:
            texts = self._texts(model_dir, self.stage_in(str(self.dataset_uri), "dataset"))
        target = self.run_folder(context) / "exports" / self.task_id
        with staged_output(target, prefix="llmops-export-") as out:
            try:
                report = export_model(
                    model_dir,
                    self.target,
                    out,
                    texts=texts,
                    gguf_type=self.gguf_type,
                    onnx_int8=self.onnx_int8,
                    new_tokens=self.new_tokens,
                    max_quality_drop=float(self.max_quality_drop),
                    threads=self.threads,
                )
            except QuantizationError as err:
                raise AirflowFailException(f"{self.task_id}: {err}") from None
        uploaded = local_folder(target) is None
        export_uri = display_uri(target) if uploaded else report.path
        self.log.info("%s", report.message)
        self.log.info("Load-back check: %s", report.check)
        for note in report.notes:
            self.log.info("Note: %s", note)
        if not report.passed:
            raise AirflowFailException(f"{self.task_id}: export gate failed: {report.message}")
        return {
            "target": report.target,
            "export_uri": export_uri,
            "files": report.files,
            "report_uri": display_uri(target / "export.json"),
            "source_model_uri": str(self.model_uri),
            "size_mb": round(report.size_bytes / 1e6, 3),
            "fp32_size_mb": round(report.fp32_size_bytes / 1e6, 3),
            "size_ratio": round(report.size_ratio, 4),
            "perplexity": report.perplexity,
            "fp32_perplexity": report.fp32_perplexity,
            "perplexity_change_pct": report.perplexity_change_pct,
            "eval_texts": report.eval_texts,
            "tokens_per_s": report.tokens_per_s,
            "fp32_tokens_per_s": report.fp32_tokens_per_s,
            "speedup": report.speedup,
            "check": report.check,
            "options": report.options,
            "passed": report.passed,
            "message": report.message,
        }

    def _texts(self, model_dir: Any, dataset_dir: Any) -> list[str]:
        from transformers import AutoTokenizer

        from airflow_llmops.ml.quantization import QuantizationError
        from airflow_llmops.ml.quantization.compare import eval_texts

        tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        try:
            texts, _ = eval_texts(
                dataset_dir,
                "validation",
                self.eval_rows,
                task="causal_lm",
                eos=str(tokenizer.eos_token or ""),
                tokenizer=tokenizer,
            )
        except QuantizationError as err:
            raise AirflowFailException(f"{self.task_id}: {err}") from None
        return texts
