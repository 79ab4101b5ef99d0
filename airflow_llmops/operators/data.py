"""The data stage: PrepareDatasetOperator and ValidateDatasetOperator."""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from airflow.sdk import Asset, AssetAlias, ObjectStoragePath
from airflow.sdk.exceptions import AirflowFailException

from airflow_llmops.links.artifacts import DatasetLink, ValidationReportLink
from airflow_llmops.operators.base import LLMOpsBaseOperator, as_storage_path, upload_tree
from airflow_llmops.specs import DatasetSpec, SpecValidationError, ValidationSpec
from airflow_llmops.uris import display_uri

if TYPE_CHECKING:
    import pandas as pd
    from airflow.sdk import Context


def dataset_asset(name: str) -> Asset:
    """The Asset a prepared dataset is published as; downstream DAGs can be scheduled on it.

    The ``x-`` scheme marks a custom URI for Airflow, which then skips its provider URI normalisers: without it
    the first Asset of a DAG file loads every installed provider's asset handlers (~2.5 s of parse time).
    """
    return Asset(name=f"llmops-dataset-{name}", uri=f"x-llmops://datasets/{name}", group="llmops")


def _spec(cls: type[Any], value: Any) -> Any:
    try:
        return cls.parse(value)
    except SpecValidationError as err:
        raise AirflowFailException(str(err)) from None


def _write_files(folder: ObjectStoragePath, files: Mapping[str, bytes]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)


class PrepareDatasetOperator(LLMOpsBaseOperator):
    """Read a dataset, normalise it, remove exact and near duplicates, split it and count its tokens.

    With ``task="chat"`` each record is a conversation (``{"messages": [{"role": ..., "content": ...}, ...]}``),
    kept as one row whose ``messages`` column holds the normalised conversation as JSON; its tokens are counted
    on :func:`~airflow_llmops.ml.data.chat.render_chat`'s text and the manifest counts conversations and turns.

    Writes ``train/validation/test.parquet``, ``removed.parquet`` (every dropped record with its reason),
    ``rejected_input.parquet`` (unreadable input lines, if any) and ``manifest.json`` to ``output_uri``
    (default ``<artifact_root>/<dag_id>/<run_id>/datasets/<name>``), and emits an event on the dataset's Asset.
    Re-running on the same input writes byte-identical files.

    :param dataset: :class:`DatasetSpec` or a mapping/JSON of one (templated).
    :param tokenizer: model whose tokenizer counts tokens (``all-MiniLM-L6-v2``, a path or a hub id);
        ``None`` or ``tiny-gpt2``: whitespace tokens (templated).
    :param output_uri: where to write; templated.
    """

    template_fields: Sequence[str] = (*LLMOpsBaseOperator.template_fields, "dataset", "tokenizer", "output_uri")
    operator_extra_links = (DatasetLink(),)
    ui_color = "#e6f7e6"

    def __init__(
        self,
        *,
        dataset: DatasetSpec | Mapping[str, Any] | str,
        tokenizer: str | None = "all-MiniLM-L6-v2",
        output_uri: str | None = None,
        **kwargs: Any,
    ) -> None:
        name = dataset.name if isinstance(dataset, DatasetSpec) else None
        if isinstance(dataset, Mapping) and "{{" not in str(dataset.get("name", "{{")):
            name = str(dataset["name"])
        if name and "outlets" not in kwargs:
            kwargs["outlets"] = [dataset_asset(name)]
        super().__init__(**kwargs)
        self.dataset = dataset
        self.tokenizer = tokenizer
        self.output_uri = output_uri

    def _read(self, spec: DatasetSpec) -> tuple[pd.DataFrame, pd.DataFrame | None]:
        from airflow_llmops.ml.data.sources import read_table

        if spec.resolved_format == "chatterbot":
            from airflow_llmops.ml.data.chatterbot import load_chatterbot

            kind: Literal["classification", "dialog", "chat"] = (
                "dialog" if spec.task == "causal_lm" else "chat" if spec.task == "chat" else "classification"
            )
            frame = load_chatterbot(spec.source, kind=kind)
            return frame.rename(columns={"messages": spec.messages_field}), None
        path = as_storage_path(spec.source, spec.conn_id)
        return read_table(path, spec.resolved_format, max_record_bytes=spec.max_record_bytes)

    def _token_counter(self) -> tuple[Any, str]:
        from airflow_llmops.ml.models import load_tokenizer

        if not self.tokenizer:
            return None, "whitespace"
        try:
            tokenizer = load_tokenizer(self.tokenizer)
        except ValueError as err:  # a wrong model name: retrying cannot fix it
            raise AirflowFailException(str(err)) from None
        if tokenizer is None:
            return None, "whitespace"

        def count(texts: list[str]) -> list[int]:
            out: list[int] = []
            for start in range(0, len(texts), 512):
                encoded = tokenizer(texts[start : start + 512], add_special_tokens=True, truncation=False)
                out.extend(len(ids) for ids in encoded["input_ids"])
            return out

        return count, self.tokenizer

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_llmops.ml.data.errors import DatasetError
        from airflow_llmops.ml.data.prepare import prepare_records, serialise

        spec: DatasetSpec = _spec(DatasetSpec, self.dataset)
        try:
            records, rejected = self._read(spec)
            count, tokenizer_name = self._token_counter()
            prepared = prepare_records(
                records, spec, count_tokens=count, tokenizer_name=tokenizer_name, rejected_input=rejected
            )
        except DatasetError as err:
            raise AirflowFailException(f"dataset {spec.name!r}: {err}") from None
        files = serialise(prepared)
        out = as_storage_path(self.output_uri) if self.output_uri else self.run_folder(context) / "datasets" / spec.name
        _write_files(out, files)
        manifest = prepared.manifest
        rows = {name: split["rows"] for name, split in manifest["splits"].items()}
        self.log.info(
            "Prepared %s: %d input rows -> %s; removed %s; %d unreadable input lines; written to %s",
            spec.name,
            manifest["input_rows"],
            rows,
            manifest["removed"] or "nothing",
            manifest["rejected_input_rows"],
            out,
        )
        extra = {
            "dataset_uri": display_uri(out),
            "content_hash": manifest["content_hash"],
            "rows": rows,
            "task": spec.task,
        }
        for outlet in self.outlets or []:
            if isinstance(outlet, Asset):
                context["outlet_events"][outlet].extra = extra
            elif isinstance(outlet, AssetAlias):  # the dataset is known only now (its name chosen by a Param)
                context["outlet_events"][outlet].add(dataset_asset(spec.name), extra=extra)
        DatasetLink().persist(context, display_uri(out / "manifest.json"))
        summary = {
            "dataset_uri": display_uri(out),
            "content_hash": manifest["content_hash"],
            "rows": rows,
            "removed": manifest["removed"],
            "rejected_input_rows": manifest["rejected_input_rows"],
            "tokens": {name: split["tokens"] for name, split in manifest["splits"].items()},
        }
        if spec.task == "chat":
            summary["turns"] = {name: split["turns"] for name, split in manifest["splits"].items()}
        return summary


class ValidateDatasetOperator(LLMOpsBaseOperator):
    """Gate a prepared dataset with Great Expectations: schema, emptiness, token lengths, labels, duplicates,
    invalid characters and personal data.

    A chat dataset (``task="chat"``) is checked per conversation and message: format, roles, role sequence,
    empty turns, invalid characters, personal data and the rendered conversation's token length; each reason
    names the message (``role_sequence:message 2 (expected 'user', got 'assistant')``).

    Failing rows go to ``<dataset>/validation/quarantine.parquet`` with their reasons; when their share is at
    most ``max_quarantine_fraction`` the clean rows continue as ``<dataset>/validated/``, otherwise the task
    fails with every failed expectation, its observed value and example row ids. The Data Docs report is
    written to ``<dataset>/validation/report/`` and linked from the task.

    :param dataset_uri: folder written by :class:`PrepareDatasetOperator` (templated).
    :param dataset_conn_id: connection to reach ``dataset_uri`` (templated); default ``artifact_conn_id``.
    :param validation: :class:`ValidationSpec` (templated).
    :param extra_expectations: Great Expectations expectation objects added to the built-in suite.
    :param suite: a Great Expectations ``ExpectationSuite`` replacing the built-in one.
    """

    template_fields: Sequence[str] = (
        *LLMOpsBaseOperator.template_fields,
        "dataset_uri",
        "dataset_conn_id",
        "validation",
    )
    operator_extra_links = (ValidationReportLink(),)
    ui_color = "#fff4e0"

    def __init__(
        self,
        *,
        dataset_uri: str,
        validation: ValidationSpec | Mapping[str, Any] | str | None = None,
        dataset_conn_id: str | None = None,
        extra_expectations: Sequence[Any] | None = None,
        suite: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.dataset_uri = dataset_uri
        self.validation = validation
        self.dataset_conn_id = dataset_conn_id
        self.extra_expectations = list(extra_expectations or [])
        self.suite = suite

    def _load(self, folder: ObjectStoragePath) -> tuple[pd.DataFrame, dict[str, Any]]:
        import io

        import pandas as pd

        manifest_path = folder / "manifest.json"
        if not manifest_path.exists():
            raise AirflowFailException(f"{folder} has no manifest.json; is it a folder written by PrepareDataset?")
        manifest = json.loads(manifest_path.read_text())
        frames = []
        for split in manifest["splits"]:
            frame = pd.read_parquet(io.BytesIO((folder / f"{split}.parquet").read_bytes()))
            frames.append(frame.assign(split=split))
        return pd.concat(frames, ignore_index=True), manifest

    def execute(self, context: Context) -> dict[str, Any]:
        from airflow_llmops.ml.data.prepare import parquet_bytes
        from airflow_llmops.ml.data.validate import validate_dataset

        spec: ValidationSpec = _spec(ValidationSpec, self.validation)
        folder = as_storage_path(self.dataset_uri, self.dataset_conn_id or self.artifact_connection())
        frame, manifest = self._load(folder)
        report = folder / "validation" / "report"
        with tempfile.TemporaryDirectory(prefix="llmops-gx-") as tmp:
            try:
                result = validate_dataset(
                    frame,
                    spec,
                    docs_dir=Path(tmp) / "report",
                    extra_expectations=self.extra_expectations or None,
                    suite=self.suite,
                    chat=manifest.get("task") == "chat",
                )
            except ValueError as err:
                raise AirflowFailException(f"cannot validate {self.dataset_uri}: {err}") from None
            if result.report_dir is not None:
                upload_tree(Path(result.report_dir), report)
        summary = result.summary()
        summary.pop("report_dir", None)  # a temporary local folder; the report's home is the store
        summary["report_url"] = ValidationReportLink().persist(context, display_uri(report / "index.html"))
        # Quarantine and summary are written before the verdict, so a failed gate leaves its evidence.
        _write_files(
            folder / "validation",
            {
                "quarantine.parquet": parquet_bytes(result.quarantine),
                "summary.json": (json.dumps(summary, indent=2, sort_keys=True) + "\n").encode(),
            },
        )
        self.log.info("Validation summary: %s", json.dumps(summary, sort_keys=True))
        self.log.info("Data Docs: %s", summary["report_url"])
        if not result.success:
            raise AirflowFailException(result.failure_message())
        out = folder / "validated"
        _write_files(out, self._validated_files(folder, manifest, result.clean, summary))
        return {"dataset_uri": display_uri(out), "summary": summary}

    @staticmethod
    def _validated_files(
        folder: ObjectStoragePath, manifest: dict[str, Any], clean: pd.DataFrame, summary: dict[str, Any]
    ) -> dict[str, bytes]:
        """The clean rows (redacted where asked) as a prepared dataset of their own, with a fresh manifest."""
        import io

        import pandas as pd

        from airflow_llmops.ml.data.prepare import PreparedDataset, build_manifest, serialise

        splits = {
            name: clean[clean["split"] == name].drop(columns="split").reset_index(drop=True)
            for name in manifest["splits"]
        }
        removed = pd.read_parquet(io.BytesIO((folder / "removed.parquet").read_bytes()))
        dataset_spec = DatasetSpec.parse(manifest["spec"])
        new_manifest = build_manifest(dataset_spec, splits, removed, manifest["input_rows"], manifest["tokenizer"])
        new_manifest.update(
            {
                "rejected_input_rows": manifest.get("rejected_input_rows", 0),
                "quarantined_rows": int(summary["quarantined_count"]),
                "validation": summary,
                "prepared_from": manifest.get("content_hash"),
            }
        )
        validated = PreparedDataset(
            splits=splits, removed=removed, rejected_input=pd.DataFrame(), manifest=new_manifest
        )
        return serialise(validated)
